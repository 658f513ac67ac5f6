"""The Label Studio adapter: label configs, label mapping and the JSON of regions.

This is the only module that knows Label Studio's JSON (with :mod:`backend.geometry` for the
percent coordinates). Everything else speaks :class:`Box` in pixels and class names.

Two kinds of label config are served (:attr:`ProjectSchema.kind`), both on exactly one ``<Image>``:

- ``"boxes"``: a ``<RectangleLabels>`` control: one box per face, with a class;
- ``"choices"``: a ``<Choices>`` control on the image and no RectangleLabels: the image's class,
  taken from its main face (:func:`backend.predict.main_face`), sent as a Choices result.

Anything else (no Image, several Images, only other controls such as PolygonLabels or TextArea)
raises :class:`LabelConfigError` with a message for the person (``/setup`` shows it in Label
Studio when the model is connected; docs/label_configs.md).

Label mapping follows the Label Studio ML backend's YOLO example (``build_label_map``): a model
class maps to a config label whose ``predicted_values`` attribute lists it, else whose ``value``
equals it exactly, else case-insensitively. Model classes the config lacks are never predicted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from backend import geometry


#: Names of one expression class that models and label configs use interchangeably (lower case).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "fearful": ("fear", "scared", "afraid"), "fear": ("fearful", "scared", "afraid"),
    "disgusted": ("disgust",), "disgust": ("disgusted",),
    "surprised": ("surprise",), "surprise": ("surprised",),
    "angry": ("anger",), "anger": ("angry",), "happy": ("happiness", "smile"), "sad": ("sadness",),
}


class LabelConfigError(ValueError):
    """The label config is unusable for faceloop (malformed XML, no Image, several Images, no
    RectangleLabels or image-level Choices on the Image, no labels). The message is for the person."""


#: The kinds of label config faceloop serves (see the module docstring).
KINDS = ("boxes", "choices")


@dataclass
class Box:
    """A face box in pixels of the EXIF-oriented image.

    Attributes:
        x1, y1, x2, y2: corners in pixels.
        label: class name (a config label), or None for a face whose class is not known yet.
        score: confidence 0-1 (None for human annotations).
    """

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    score: float | None = None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass
class ProjectSchema:
    """What faceloop needs of a project's label config.

    Attributes:
        from_name: name of the RectangleLabels control (e.g. ``"face"``), or of the Choices
            control for ``kind == "choices"``.
        to_name: name of the Image object (e.g. ``"image"``).
        value_key: key of the image URL in ``task["data"]`` (the Image's ``value`` without ``$``).
        labels: the control's label values (``<Label>``, or ``<Choice>`` values), in config order
            (this order is the class index order of every model faceloop trains for the project).
        predicted_values: per label, the model class names the ``predicted_values`` attribute lists.
        score_threshold: the control's ``model_score_threshold`` (0-1), if given.
        kind: ``"boxes"`` (RectangleLabels: face boxes) or ``"choices"`` (the image's class).
    """

    from_name: str
    to_name: str
    value_key: str
    labels: list[str]
    predicted_values: dict[str, list[str]] = field(default_factory=dict)
    score_threshold: float | None = None
    kind: str = "boxes"

    @property
    def is_choices(self) -> bool:
        """True for an image-level Choices config (no boxes)."""
        return self.kind == "choices"

    @classmethod
    def parse(cls, label_config: str) -> "ProjectSchema":
        """Parse a label config XML with the SDK's ``LabelInterface``.

        The config must hold exactly one ``<Image>``; on it, a ``<RectangleLabels>`` control gives
        a ``"boxes"`` schema (it wins when there is also a Choices control), else an image-level
        ``<Choices>`` (not ``perRegion``) gives a ``"choices"`` schema. Other controls are left to
        the person.

        Raises:
            LabelConfigError: malformed XML, no Image or several, neither control on the Image, or
                no labels; the message says what faceloop serves instead.
        """
        if not label_config or not label_config.strip():
            raise LabelConfigError("label config is empty")
        try:
            li = LabelInterface(label_config)
        except Exception as e:  # the SDK raises several XML error types
            raise LabelConfigError(f"label config is not valid XML: {e}") from e
        images = [o for o in li.objects if o.tag == "Image"]
        if len(images) > 1:
            names = ", ".join(f'"{o.name}"' for o in images)
            raise LabelConfigError(f"label config has {len(images)} Image tags ({names}): faceloop serves "
                                   f"configs with exactly one Image")
        if not images:
            others = ", ".join(sorted({o.tag for o in li.objects})) or "none"
            raise LabelConfigError(f"label config has no Image tag (objects: {others}): faceloop labels faces "
                                   f"in images")
        image = images[0]
        kind, tag = "boxes", "Label"
        try:
            from_name, to_name, value = li.get_first_tag_occurence("RectangleLabels", "Image")
        except ValueError:
            choices = [c for c in li.controls if c.tag == "Choices" and image.name in (c.to_name or [])
                       and str((c.attr or {}).get("perRegion", "false")).lower() != "true"]
            if not choices:
                present = ", ".join(sorted({c.tag for c in li.controls})) or "no control tag"
                raise LabelConfigError(
                    f"label config has no <RectangleLabels> control on an <Image> and no image-level <Choices> "
                    f"(it has {present}): faceloop predicts face boxes (RectangleLabels) or the image's class "
                    f"(Choices)") from None
            kind, tag = "choices", "Choice"
            from_name, to_name, value = choices[0].name, image.name, image.value_name
        ctrl = li.get_control(from_name)
        labels = list(ctrl.labels)
        if not labels:
            raise LabelConfigError(f"<{ctrl.tag} name=\"{from_name}\"> has no <{tag}> children")
        pv = {}
        for lab in labels:
            raw = (ctrl.labels_attrs[lab].attr or {}).get("predicted_values") if lab in (ctrl.labels_attrs or {}) else None
            if raw:
                pv[lab] = [v.strip() for v in str(raw).split(",") if v.strip()]
        thr = (ctrl.attr or {}).get("model_score_threshold") or (ctrl.attr or {}).get("score_threshold")
        try:
            thr_f = float(thr) if thr is not None else None
        except ValueError:
            raise LabelConfigError(f"model_score_threshold={thr!r} is not a number") from None
        return cls(from_name, to_name, value.lstrip("$"), labels, pv, thr_f, kind)

    def label_map(self, model_names: list[str]) -> dict[int, str]:
        """Map model class indices to this config's labels.

        Order of rules: the label's ``predicted_values`` attribute lists the class; the label
        equals it; equals it case-insensitively; equals one of its :data:`SYNONYMS` (the
        face-api.js expression net says ``fearful``, ``disgusted``, ``surprised`` where label
        configs and datasets say ``fear``, ``disgust``, ``surprise``).

        Args:
            model_names: the model's class names in index order.
        Returns: ``{model_class_index: label}`` for the classes the config knows (others absent).
        """
        out: dict[int, str] = {}
        for i, name in enumerate(model_names):
            hit = next((lab for lab, vals in self.predicted_values.items() if name in vals), None)
            if hit is None:
                hit = next((lab for lab in self.labels if lab == name), None)
            if hit is None:
                hit = next((lab for lab in self.labels if lab.lower() == str(name).lower()), None)
            if hit is None:
                syn = SYNONYMS.get(str(name).lower(), ())
                hit = next((lab for lab in self.labels if lab.lower() in syn), None)
            if hit is not None:
                out[i] = hit
        return out

    def class_index(self, label: str) -> int:
        """Index of ``label`` in :attr:`labels` (exact, then case-insensitive).

        Raises: KeyError for a label the config does not have.
        """
        if label in self.labels:
            return self.labels.index(label)
        low = [lab.lower() for lab in self.labels]
        if label.lower() in low:
            return low.index(label.lower())
        raise KeyError(f"label {label!r} is not in the project's labels {self.labels}")

    # --- regions -------------------------------------------------------------------------------
    def region(self, box: Box, width: int, height: int) -> dict:
        """A RectangleLabels region for Label Studio.

        Args:
            box: pixels; ``box.label`` None gives an unlabelled face box (``rectanglelabels: []``)
                that the person only has to give a class.
            width, height: image size in pixels (EXIF-oriented); sent as ``original_width/height``.
        Returns: region dict with a unique ``id``, percent coordinates, and the region ``score``.
        """
        value = geometry.pixels_to_percent(box.x1, box.y1, box.x2, box.y2, width, height)
        value["rectanglelabels"] = [box.label] if box.label else []
        r = {
            "id": uuid.uuid4().hex[:10],
            "from_name": self.from_name,
            "to_name": self.to_name,
            "type": "rectanglelabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": value,
        }
        if box.score is not None:
            r["score"] = round(float(box.score), 4)
        if box.label is None:
            r["meta"] = {"text": ["face found; the model does not know this project's classes yet: pick one"]}
        return r

    def boxes_from_result(self, result: list[dict]) -> tuple[list[tuple[float, float, float, float, int]], list[str]]:
        """Turn an annotation's ``result`` into YOLO boxes of this project's classes.

        Args:
            result: Label Studio regions (as in an annotation).
        Returns: ``(boxes, problems)`` with boxes ``(cx, cy, w, h, class_index)`` normalised 0-1,
            and human-readable problems (unknown labels, regions without a label), which the
            caller reports; regions of other controls are ignored.
        """
        boxes, problems = [], []
        for r in result or []:
            if r.get("from_name") != self.from_name or r.get("type", "").lower() != "rectanglelabels":
                continue
            value = r.get("value") or {}
            labs = value.get("rectanglelabels") or []
            if not labs:
                problems.append(f"region {r.get('id')} has no label")
                continue
            try:
                cls = self.class_index(labs[0])
                cx, cy, w, h = geometry.percent_to_yolo(value, r.get("original_width") or 100,
                                                        r.get("original_height") or 100)
            except (KeyError, ValueError, TypeError) as e:
                problems.append(f"region {r.get('id')}: {e}")
                continue
            if w <= 0 or h <= 0:
                problems.append(f"region {r.get('id')} has zero size")
                continue
            boxes.append((cx, cy, w, h, cls))
        return boxes, problems

    # --- image-level choices ---------------------------------------------------------------------
    def choice_region(self, label: str, score: float | None = None) -> dict:
        """A Choices result item for Label Studio (``kind == "choices"``):
        ``{"id", "from_name", "to_name", "type": "choices", "value": {"choices": [label]}, "score"}``.

        Args:
            label: one of :attr:`labels`; score: confidence 0-1 (omitted when None).
        Raises: KeyError for a label the config does not have.
        """
        lab = self.labels[self.class_index(label)]
        r = {"id": uuid.uuid4().hex[:10], "from_name": self.from_name, "to_name": self.to_name,
             "type": "choices", "value": {"choices": [lab]}}
        if score is not None:
            r["score"] = round(float(score), 4)
        return r

    def choice_from_result(self, result: list[dict]) -> tuple[int | None, list[str]]:
        """The image's class in an annotation's ``result`` (``kind == "choices"``).

        Args:
            result: Label Studio result items; items of other controls are ignored.
        Returns: ``(class_index, problems)``: the index into :attr:`labels` of the (first) chosen
            value of this control, or None with a human-readable problem when there is no choice,
            or an unknown one. With several values chosen (``choice="multiple"``) the first
            known one counts.
        """
        chosen: list[str] = []
        for r in result or []:
            if r.get("from_name") != self.from_name or str(r.get("type", "")).lower() != "choices":
                continue
            chosen.extend(c for c in ((r.get("value") or {}).get("choices") or []) if isinstance(c, str))
        if not chosen:
            return None, [f"no choice of \"{self.from_name}\" in the annotation"]
        for c in chosen:
            try:
                return self.class_index(c), []
            except KeyError:
                continue
        return None, [f"choice {chosen[0]!r} is not in the project's labels {self.labels}"]
