"""faceloop ML backend: serves YOLO pre-annotations to Label Studio and records its events."""

__version__ = "0.1.0"
