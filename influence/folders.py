"""Class folders -> labels, and the image files in them.

Train folder: one sub-folder per class. If every class folder is named by an
ILSVRC-2012 WordNet id, a class's label is its index among the 1000 ImageNet
classes (the order of VGG16's outputs), even when only some classes are
present. Otherwise labels are the positions of the folder names in natural
order (``2`` before ``10``).

Test folders: class folders named like a train class, or by label index
(``779``). Both resolve to the same label.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from influence import imagenet, interrupts
from influence.decode import is_image_file
from influence.errors import UserError

IMAGENET = "imagenet"  # labels are ILSVRC-2012 indices
NATURAL = "natural"  # labels are positions in natural sort order
_DIGITS = re.compile(r"(\d+)")
MAX_LABEL = 2**31 - 1  # archives store labels as int32
_LIST_LIMIT = 8


def natural_key(name: str):
    """Sort key: digit runs compare as numbers, text case-insensitively, ties by the exact name."""
    parts = _DIGITS.split(name)  # text, digits, text, ... : the type at each position is fixed
    return tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(parts)), name


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _LIST_LIMIT else "")


@dataclass
class ClassFolder:
    """One class folder and the image files in it (paths relative to the folder above)."""

    folder: str
    label: int
    files: list[str] = field(default_factory=list)
    ignored: int = 0


@dataclass
class Classes:
    """The train classes: how labels were assigned and ``label -> (folder, name)``."""

    labeling: str  # IMAGENET or NATURAL
    folders: dict[str, int]  # folder name -> label
    names: dict[int, str]  # label -> human name ("tench", or the folder name)

    @classmethod
    def from_folders(cls, folder_names: list[str]) -> "Classes":
        """Labels for the train class folders (see the module docstring)."""
        known = [name for name in folder_names if imagenet.is_wnid(name)]
        if known and len(known) == len(folder_names):
            folders = {name: imagenet.label_of(name) for name in folder_names}
            return cls(IMAGENET, folders, {label: imagenet.class_name(label) for label in folders.values()})
        others = [name for name in folder_names if not imagenet.is_wnid(name)]
        if known:
            # Half-ImageNet folders are almost surely a typo; labels by position would be silently wrong for VGG16.
            raise UserError(f"train class folders mix ILSVRC-2012 WordNet ids ({_listing(known)}) with other "
                            f"names ({_listing(others)}): name every class folder by one of the 1000 ImageNet "
                            f"wnids, or none of them")
        ordered = sorted(folder_names, key=natural_key)
        return cls(NATURAL, {name: label for label, name in enumerate(ordered)},
                   {label: name for label, name in enumerate(ordered)})

    @classmethod
    def from_meta(cls, meta: dict) -> "Classes":
        """The classes recorded in a train archive's metadata (checked by :mod:`influence.archive`,
        which leaves ``labeling`` and the class folders optional for archives written by hand)."""
        entries = meta.get("classes", [])
        if meta.get("labeling") is None or not entries or any("folder" not in entry for entry in entries):
            raise UserError("the train archive's metadata lacks its labelling or class folders; "
                            "prepare it again with prepare_data.py")
        return cls(meta["labeling"], {entry["folder"]: int(entry["label"]) for entry in entries},
                   {int(entry["label"]): entry["name"] for entry in entries})

    def resolve(self, name: str, *, where: str) -> int:
        """The label of a test class folder ``name`` (a train class name or a label index)."""
        if name in self.folders:
            return self.folders[name]
        if self.labeling == IMAGENET:
            if imagenet.is_wnid(name):
                return imagenet.label_of(name)
            if name.isdecimal() and int(name) < imagenet.N_CLASSES:
                return int(name)
            expected = f"an ILSVRC-2012 wnid (train has {_listing(sorted(self.folders))}) or a label index 0-999"
        elif any(folder.isdecimal() for folder in self.folders):
            # With numbered train folders, "2" could mean folder 2 or label 2: accept names only.
            expected = f"one of the train class folders {_listing(sorted(self.folders, key=natural_key))}"
        else:
            if name.isdecimal() and int(name) < len(self.folders):
                return int(name)
            expected = (f"one of the train class folders {_listing(sorted(self.folders, key=natural_key))} "
                        f"or a label index 0-{len(self.folders) - 1}")
        raise UserError(f"test class folder {where} matches no class: expected {expected}")

    def name(self, label: int) -> str:
        if label in self.names:
            return self.names[label]
        return imagenet.class_name(label) if self.labeling == IMAGENET else str(label)


def resolve_without_train(name: str, *, where: str) -> tuple[int, str]:
    """(label, human name) of a test class folder when there is no train archive to ask."""
    if imagenet.is_wnid(name):
        label = imagenet.label_of(name)
        return label, imagenet.class_name(label)
    if name.isdecimal():
        if int(name) > MAX_LABEL:
            raise UserError(f"test class folder {where}: label {name} is too large (label indices go up to "
                            f"{MAX_LABEL}; a classifier has one output per label)")
        return int(name), name
    raise UserError(f"test class folder {where} matches no class: without a train.npz in the output "
                    f"directory, name test class folders by label index (e.g. 779) or ILSVRC-2012 wnid, "
                    f"or run prepare_data.py first")


def check_folder(path: Path, what: str) -> Path:
    """``path`` if it is an existing folder, else a :class:`UserError` naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{what} folder {path} is not a folder")
    return path


def class_folder_names(root: Path, what: str) -> tuple[list[str], int]:
    """(visible sub-folders of ``root`` in natural order, number of other entries ignored)."""
    try:
        entries = list(os.scandir(root))
    except OSError as error:
        raise UserError(f"cannot read {what} folder {root}: {error.strerror}") from None
    names = sorted((entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")),
                   key=natural_key)
    if not names:
        raise UserError(f"{what} folder {root} has no class folders (expected one sub-folder per class)")
    return names, len(entries) - len(names)


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a dangling link
        return False


def image_files(class_dir: Path, folder: str) -> tuple[list[str], int]:
    """(image paths under ``class_dir`` as ``folder/...`` in natural order, number of other files ignored).

    Sub-folders are searched too; hidden files and folders are skipped, and so are entries that
    are not regular files (FIFOs, devices, sockets, dangling links): they count as ignored.
    """
    files: list[str] = []
    ignored = 0
    for directory, subdirs, names in os.walk(class_dir):
        interrupts.checkpoint()  # an ImageNet class folder on a network drive takes a while
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        relative = Path(directory).relative_to(class_dir)
        for name in names:
            # Only regular files (or links to them): opening a FIFO named x.jpg would wait forever.
            if is_image_file(name) and _is_regular_file(os.path.join(directory, name)):
                files.append((Path(folder) / relative / name).as_posix())
            else:
                ignored += 1
    if not files:
        raise UserError(f"class folder {class_dir} has no images (files ending in .jpg, .jpeg, .png, .bmp, "
                        f".gif, .webp, .tif, ...)")
    files.sort(key=natural_key)
    return files, ignored
