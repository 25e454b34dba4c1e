"""Ground truth for ``npcam evaluate``: three annotation formats read into one record per photo.

- **Pascal VOC / ILSVRC XML**: a folder of ``.xml`` files (or one file), one
  per photo, matched to the photos by file stem (``Annotations/000005.xml``
  is ``000005.jpg``). Each ``<object>`` gives ``<name>`` and ``<bndbox>``
  (``xmin ymin xmax ymax``, 1-based inclusive pixels as in VOC's devkit; npcam's are 0-based).
- **COCO JSON**: ``images`` (``id``, ``file_name``), ``annotations``
  (``image_id``, ``category_id``, ``bbox`` as ``[x, y, width, height]``) and
  ``categories`` (``id``, ``name``). ``file_name`` is relative to the photos' folder.
- **CSV** in the dev set's format: ``file`` (relative to the photos' folder),
  a class column (``class``, ``imagenet_index`` or ``label``; ``285|281``
  means 285) and ``bboxes_xyxy`` (``x0,y0,x1,y1;…``, 0-based inclusive pixels; empty for none).

A class name becomes one of the bundle's classes through the mapping file, if
given, else by :func:`npcam.labels.class_index` (an index, a label or one of
its comma-separated names). A mapping file is a JSON object (``{"dog": 208,
"n01440764": "tench"}``; COCO category ids as strings also work) or a text
file whose line ``i`` starts with the name of class ``i`` (ILSVRC's
``LOC_synset_mapping.txt``, ``synset_words.txt``). Boxes of a class that maps
to no class are left out, with one warning line per class. A photo with
boxes of several classes is evaluated for the class whose boxes cover the
largest area, against that class's boxes. A detector is evaluated against every
annotated object of a photo (:attr:`Annotation.objects`); a CSV line names one class.
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .boxes import Box
from .errors import NpcamError
from .labels import class_index


@dataclass(frozen=True)
class Annotation:
    """One photo's ground truth: the class a classifier is evaluated for (None: unknown) and that class's boxes;
    ``objects``, every annotated ``(class, box)`` of a class of the model (what a detector is evaluated against).

    ``error`` is set, and the rest empty, when the photo's own annotation could not be read.
    """

    label: int | None = None
    boxes: tuple[Box, ...] = ()
    error: str | None = None
    objects: tuple[tuple[int, Box], ...] = ()


@dataclass
class Annotations:
    """What an annotation file or folder says, keyed as its format matches photos (see :meth:`match`)."""

    source: str
    by_path: dict[str, Annotation] = field(default_factory=dict)  # CSV, COCO: paths relative to the photos' folder
    by_stem: dict[str, Annotation] = field(default_factory=dict)  # XML: file stems
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.by_path) + len(self.by_stem)

    def match(self, photos: Sequence[str], root: str | None) -> tuple[list[Annotation | None], list[str]]:
        """Each photo's annotation (None: none), and the annotated names that no photo matched.

        CSV and COCO paths are relative to ``root``, the photos' folder; XML files match by stem.
        """
        found: list[Annotation | None] = []
        used: set[str] = set()
        if self.by_stem:
            stems = Counter(Path(p).stem for p in photos)
            for photo in photos:
                stem = Path(photo).stem
                entry = self.by_stem.get(stem)
                if entry is not None and stems[stem] > 1:
                    entry = Annotation(error=f"{self.source}: {stems[stem]} photos have the stem {stem!r}; "
                                       "XML annotations match photos by stem")  # fmt: skip
                found.append(entry)
                used.add(stem)
            return found, sorted(set(self.by_stem) - used)
        if self.by_path and root is None:
            raise NpcamError(f"{self.source}: its paths are relative to the photos' folder; give a folder of photos")
        for photo in photos:
            key = _key(os.path.relpath(photo, root)) if root is not None else _key(photo)
            entry = self.by_path.get(key) or self.by_path.get(_key(os.path.abspath(photo)))
            found.append(entry)
            if entry is not None:
                used.add(key if key in self.by_path else _key(os.path.abspath(photo)))
        return found, sorted(set(self.by_path) - used)


def _key(path: str) -> str:
    return str(PurePosixPath(*Path(path).parts)) if path else path


def read(path: str | os.PathLike, labels: Sequence[str], mapping: str | os.PathLike | None = None) -> Annotations:
    """Read annotations (a CSV, a COCO JSON, an XML file or a folder of them) for a model's ``labels``.

    One-line :class:`NpcamError` for a missing or unreadable source, or when no annotated class maps
    to a class of the model; a single unreadable XML file is an error of its photo only.
    """
    source = Path(path)
    if not source.exists():
        raise NpcamError(f"{source}: no such annotation file or folder")
    names = _Classes(labels, read_mapping(mapping) if mapping else {}, str(mapping or ""))
    if source.is_dir():
        files = sorted(source.rglob("*.xml"))
        if not files:
            raise NpcamError(f"{source}: a folder without .xml annotation files")
        result = Annotations(str(source))
        for file in files:
            result.by_stem[file.stem] = _xml(file, names)
    elif source.suffix.lower() == ".xml":
        result = Annotations(str(source), by_stem={source.stem: _xml(source, names)})
    elif source.suffix.lower() == ".json":
        result = _coco(source, names)
    elif source.suffix.lower() in (".csv", ".tsv", ".txt"):
        result = _csv(source, names)
    else:
        raise NpcamError(f"{source}: not a CSV, COCO JSON or XML annotation file (by its extension)")
    result.warnings = names.warnings()
    entries = [*result.by_path.values(), *result.by_stem.values()]
    if names.unmapped and not any(e.label is not None for e in entries):
        raise NpcamError(f"{source}: no annotated class is a class of the model ({names.example()}); "
                         "give a mapping file (--classes)")  # fmt: skip
    return result


def read_mapping(path: str | os.PathLike) -> dict[str, int | str]:
    """A mapping file: a JSON object ``{name: class index or label}``, or text whose line i names class i."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as e:
        raise NpcamError(f"{source}: cannot read the class mapping ({e.strerror or e})") from None
    if source.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except ValueError as e:
            raise NpcamError(f"{source}: not JSON ({e})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, (int, str)) for v in mapping.values()):
            raise NpcamError(f"{source}: a class mapping must be a JSON object of class indices or labels")
        return {str(k): v for k, v in mapping.items()}
    return {line.split()[0]: i for i, line in enumerate(text.splitlines()) if line.split()}


class _Classes:
    """Annotated class names to the model's class indices, remembering the names that map to none."""

    def __init__(self, labels: Sequence[str], mapping: dict[str, int | str], source: str):
        self.labels, self.mapping, self.source = labels, mapping, source
        self.cache: dict[tuple[str, ...], int | None] = {}
        self.unmapped: Counter[str] = Counter()

    def index(self, name: str, ids: Sequence[str] = ()) -> int | None:
        """The class of ``name`` (or of one of ``ids``, looked up in the mapping only: COCO category ids)."""
        key = (name, *ids)
        if key not in self.cache:
            self.cache[key] = self._lookup(name, ids)
        if self.cache[key] is None:
            self.unmapped[name] += 1
        return self.cache[key]

    def _lookup(self, name: str, ids: Sequence[str]) -> int | None:
        for key in (*ids, name):
            if key in self.mapping:
                try:
                    return class_index(self.labels, self.mapping[key])
                except NpcamError:
                    raise NpcamError(f"{self.source}: maps {key!r} to {self.mapping[key]!r}, which is not a class "
                                     "of the model") from None  # fmt: skip
        try:
            return class_index(self.labels, name)
        except NpcamError:
            return None

    def example(self) -> str:
        name, _ = self.unmapped.most_common(1)[0]
        return f"e.g. {name!r}"

    def warnings(self) -> list[str]:
        return [f"annotated class {name!r} maps to no class of the model: its {n} box(es) are left out"
                for name, n in sorted(self.unmapped.items())]  # fmt: skip


def _choose(boxes: list[tuple[int, Box]]) -> Annotation:
    """One photo's record from its ``(class, box)`` pairs: the class with the largest boxed area."""
    if not boxes:
        return Annotation()
    area: defaultdict[int, float] = defaultdict(float)
    for c, (x0, y0, x1, y1) in boxes:
        area[c] += (x1 - x0 + 1) * (y1 - y0 + 1)
    label = max(area, key=lambda c: (area[c], -c))
    return Annotation(label, tuple(b for c, b in boxes if c == label), objects=tuple(boxes))


def _box(x0: float, y0: float, x1: float, y1: float, what: str) -> Box:
    values = [x0, y0, x1, y1]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: not a number in {values}")
    box = tuple(int(round(v)) for v in values)
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{what}: x1 < x0 or y1 < y0 in {list(box)}")
    return box  # type: ignore[return-value]


def _xml(file: Path, names: _Classes) -> Annotation:
    """One VOC/ILSVRC XML file; its errors become the record's ``error`` (its photo fails, not the run)."""
    try:
        root = ElementTree.parse(file).getroot()
        pairs = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            box = obj.find("bndbox")
            if not name or box is None:
                raise ValueError("an <object> without <name> or <bndbox>")
            corners = [float(box.findtext(k) or "nan") - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
            x0, y0, x1, y1 = _box(*corners, what="<bndbox>")
            c = names.index(name)
            if c is not None:
                pairs.append((c, (max(x0, 0), max(y0, 0), x1, y1)))
        return _choose(pairs)
    except ElementTree.ParseError as e:
        return Annotation(error=f"{file}: not XML ({e})")
    except (OSError, ValueError) as e:
        return Annotation(error=f"{file}: {getattr(e, 'strerror', None) or e}")


def _coco(file: Path, names: _Classes) -> Annotations:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        images = {image["id"]: image["file_name"] for image in data["images"]}
        categories = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", [])}
        annotations = data["annotations"]
    except OSError as e:
        raise NpcamError(f"{file}: cannot read it ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise NpcamError(f"{file}: not COCO JSON (images, annotations, categories): {type(e).__name__} {e}") from None
    pairs: defaultdict[object, list[tuple[int, Box]]] = defaultdict(list)
    broken: dict[object, str] = {}
    for n, a in enumerate(annotations):
        try:
            image, category = a["image_id"], a["category_id"]
            x, y, w, h = (float(v) for v in a["bbox"])
            box = _box(math.floor(x), math.floor(y), math.ceil(x + w) - 1, math.ceil(y + h) - 1, f"annotation {n}")
        except (KeyError, TypeError, ValueError) as e:
            broken[a.get("image_id") if isinstance(a, dict) else None] = f"{file}: annotation {n}: {e}"
            continue
        c = names.index(categories.get(category, str(category)), ids=(str(category),))
        if c is not None:
            pairs[image].append((c, (max(box[0], 0), max(box[1], 0), box[2], box[3])))
    result = Annotations(str(file))
    for image, name in images.items():
        entry = Annotation(error=broken[image]) if image in broken else _choose(pairs.get(image, []))
        result.by_path[_key(str(name))] = entry
    return result


def _csv(file: Path, names: _Classes) -> Annotations:
    try:
        with open(file, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if file.suffix.lower() == ".tsv" else ","))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise NpcamError(f"{file}: cannot read it as CSV ({getattr(e, 'strerror', None) or e})") from None
    columns = set(rows[0]) if rows else set()
    if "file" not in columns:
        raise NpcamError(f"{file}: a CSV of annotations needs a 'file' column")
    label_column = next((c for c in ("class", "imagenet_index", "label") if c in columns), None)
    box_column = next((c for c in ("bboxes_xyxy", "boxes") if c in columns), None)
    result = Annotations(str(file))
    for n, row in enumerate(rows, 2):
        key = _key(row["file"] or "")
        try:
            value = (row.get(label_column) or "").split("|")[0].strip() if label_column else ""
            label = names.index(value) if value else None
            boxes = []
            for part in (row.get(box_column) or "").split(";") if box_column else []:
                if part.strip():
                    x0, y0, x1, y1 = (float(v) for v in part.split(","))
                    boxes.append(_box(x0, y0, x1, y1, f"line {n}"))
            if label is not None:
                entry = Annotation(label, tuple(boxes), objects=tuple((label, b) for b in boxes))
            else:  # boxes without a class, or a class of no class of the model (then nothing)
                entry = Annotation(None, tuple(boxes)) if not value else Annotation()
        except ValueError as e:
            entry = Annotation(error=f"{file}: line {n}: {e}")
        result.by_path[key] = entry
    return result
