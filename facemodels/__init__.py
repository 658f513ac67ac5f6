"""Face models shared by the backend and the worker.

Stage 2 of the two-stage pre-labels (docs/design.md, "Two stages"): a face-crop classifier
initialised from the face-api.js expression net, ported to PyTorch (``facemodels.faceapi_net``),
with its exact input preprocessing (``facemodels.preprocess``) and the product interface
(``facemodels.classifier``: ``FaceClassifier``, ``fine_tune``, ``default_classifier_path``).

Importing this package is cheap; ``torch`` is imported by the submodules that need it.
"""
