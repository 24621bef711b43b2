"""Static pages to browse a results store: no server, no external assets.

``<output_dir>/index.html``       the folders, the failures, the most frequent harmful training
                                  images and the settings
``<output_dir>/html/<folder>.html``  every test image of one folder: its thumbnail, label,
                                  prediction, top harmful and useful training images with their
                                  scores, and links to its figures, record and score table
``<output_dir>/html/thumbs/``     small PNG thumbnails (train/<index>.png, test/<folder>/<row>.png)

Everything is read from ``results.h5`` (:mod:`influence.store`) and the two archives (the
thumbnails); every link is relative and points at a file that exists when the page is written.
"""

from __future__ import annotations

import collections
import html
import json
from pathlib import Path
from urllib.parse import quote

import numpy as np

from influence import outputs, store
from influence.errors import UserError

PAGES_DIR = "html"
THUMBNAIL_PIXELS = 96
FREQUENT = 20  # training images listed on the front page

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; font-size: 0.9em; }
img.thumb { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #eee; }
.harmful { color: #b00; } .useful { color: #070; } .wrong { color: #b00; font-weight: bold; }
figure { display: inline-block; margin: 0 0.4em 0.4em 0; text-align: center; font-size: 0.8em; width: 100px; }
figcaption { overflow-wrap: anywhere; }
section { border-top: 1px solid #ccc; padding-top: 0.5em; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _href(path: str) -> str:
    return html.escape(quote(path), quote=True)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_e(title)}</title>\n"
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _save_thumbnail(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    picture = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    outputs.write_with(path, lambda file: picture.save(file, format="PNG"))


def _named(label: int, names: dict) -> str:
    name = names.get(int(label))
    return f"{label} ({name})" if name else str(label)


def build(output_dir, *, train, test, top: int = 5) -> Path:
    """Write the front page, one page per test folder and their thumbnails from ``results.h5``;
    ``train`` and ``test`` are the open archives the run used. Returns the front page."""
    from influence import archive

    output_dir = Path(output_dir)
    path = store.store_path(output_dir)
    header = store.read_header(path)
    tests = store.read_table(path, "tests")
    failures = store.read_table(path, "failures")
    missing = store.read_table(path, "missing")
    ranking = store.rank(path, top)
    names = archive.class_names(train, test)
    pages = output_dir / PAGES_DIR
    thumbs = pages / "thumbs"

    # Thumbnails: every test image shown and every training image in a top list.
    test_thumb = {}
    for folder in dict.fromkeys(tests["folder"]):
        test_set = test.folder(folder)
        for i in np.flatnonzero(tests["folder"] == folder):
            row = int(tests["archive_row"][i])
            if not 0 <= row < len(test_set.ids) or str(test_set.ids[row]) != tests["test_id"][i]:
                raise UserError(
                    f"{test.path} does not hold the test images of {output_dir} ({folder}/{tests['test_id'][i]} "
                    f"is not at row {row} of folder {folder}); give the test archive the run used (--test)"
                )
            relative = f"thumbs/test/{folder}/{row}.png"
            _save_thumbnail(pages / relative, test_set.images[row])
            test_thumb[i] = relative
    shown = np.unique(np.concatenate([ranking.harmful_index.ravel(), ranking.useful_index.ravel()]))
    for start in range(0, len(shown), 256):
        chunk = shown[start:start + 256]
        for index, image in zip(chunk, train.read(chunk)):
            _save_thumbnail(thumbs / "train" / f"{index}.png", image)

    def train_figure(index: int, score: float | None, prefix: str) -> str:
        sign = "harmful" if score is not None and score < 0 else "useful"
        caption = f"<span class=\"{sign}\">{score:+.3g}</span><br>" if score is not None else ""
        return (f"<figure><img class=\"thumb\" src=\"{_href(f'{prefix}thumbs/train/{index}.png')}\" "
                f"alt=\"training image {_e(train.ids[index])}\"><figcaption>{caption}{_e(train.ids[index])}<br>"
                f"label {_e(_named(train.labels[index], names))}</figcaption></figure>")

    def file_links(i: int, prefix: str) -> str:
        links = []
        for column, text in (("harmful_figure", "harmful figure"), ("useful_figure", "useful figure"),
                             ("record_file", "record"), ("score_file", "all scores (.npy)")):
            relative = str(tests[column][i])
            if relative and (output_dir / relative).is_file():
                links.append(f"<a href=\"{_href(prefix + relative)}\">{text}</a>")
        return " · ".join(links)

    folders = list(dict.fromkeys(list(tests["folder"]) + list(failures["folder"]) + list(missing["folder"])))
    for folder in folders:
        members = np.flatnonzero(tests["folder"] == folder)
        sections = []
        for i in members:
            label, predicted = int(tests["label"][i]), int(tests["predicted"][i])
            prediction_class = "" if label == predicted else " class=\"wrong\""
            rows = "".join(
                f"<p><b class=\"{kind}\">Top {ranking.harmful_index.shape[1]} {kind}</b><br>"
                + "".join(train_figure(int(index), float(score), "")
                          for index, score in zip(indices[i], scores[i])) + "</p>"
                for kind, indices, scores in (("harmful", ranking.harmful_index, ranking.harmful_score),
                                              ("useful", ranking.useful_index, ranking.useful_score))
            )
            sections.append(
                f"<section id=\"test-{i}\"><h3>{_e(tests['test_id'][i])}</h3>"
                f"<figure><img class=\"thumb\" src=\"{_href(test_thumb[i])}\" alt=\"test image {_e(tests['test_id'][i])}\"></figure>"
                f"<p>label {_e(_named(label, names))} · <span{prediction_class}>predicted "
                f"{_e(_named(predicted, names))}</span> · test loss {tests['test_loss'][i]:.4g} · "
                f"image #{tests['number'][i]} of its label<br>{file_links(i, '../')}</p>{rows}</section>"
            )
        failed_here = np.flatnonzero(failures["folder"] == folder)
        failed_html = _failure_table(failures, failed_here, output_dir, "../") if len(failed_here) else ""
        body = (f"<p><a href=\"../index.html\">all folders</a></p><h1>Test folder {_e(folder)}</h1>"
                f"<p>{len(members)} test images explained, {len(failed_here)} failed. Scores: positive = useful "
                f"(removing the training image would raise the test loss), negative = harmful.</p>"
                + failed_html + "".join(sections))
        outputs.write_with(pages / f"{folder}.html", lambda file, body=body, folder=folder: file.write(
            _page(f"Influence results: {folder}", body)), mode="w")

    # Front page.
    folder_rows = "".join(
        f"<tr><td><a href=\"{_href(f'{PAGES_DIR}/{folder}.html')}\">{_e(folder)}</a></td>"
        f"<td>{int(np.sum(tests['folder'] == folder))}</td><td>{int(np.sum(failures['folder'] == folder))}</td>"
        f"<td>{int(np.sum(missing['folder'] == folder))}</td></tr>"
        for folder in folders
    )
    frequent = collections.Counter(int(index) for index in ranking.harmful_index.ravel())
    per_folder = {index: collections.Counter() for index in frequent}
    for i, indices in enumerate(ranking.harmful_index):
        for index in indices:
            per_folder[int(index)][tests["folder"][i]] += 1
    frequent_rows = "".join(
        f"<tr><td>{count}</td><td>{train_figure(index, None, f'{PAGES_DIR}/')}</td>"
        f"<td>{_e(', '.join(f'{folder}: {n}' for folder, n in per_folder[index].most_common()))}</td></tr>"
        for index, count in frequent.most_common(FREQUENT)
    )
    failures_html = (_failure_table(failures, np.arange(len(failures["folder"])), output_dir, "")
                     if len(failures["folder"]) else "<p>None.</p>")
    missing_html = ""
    if len(missing["folder"]):
        missing_html = ("<h2>Missing</h2><p>Planned test images without a result: "
                        + _e(", ".join(f"{f}/{l}/{n}" for f, l, n in zip(missing["folder"], missing["label"],
                                                                           missing["number"]))) + "</p>")
    body = (
        f"<h1>Influence results</h1><p>{len(tests['test_id'])} test images explained, "
        f"{len(failures['folder'])} failed, {len(missing['folder'])} missing; mode {_e(header['mode'])} "
        f"over {header['n_train']} training images. All scores in one table: "
        f"<a href=\"{_href(store.STORE_NAME)}\">{store.STORE_NAME}</a>.</p>"
        f"<h2>Test folders</h2><table><tr><th>folder</th><th>explained</th><th>failed</th><th>missing</th></tr>"
        f"{folder_rows}</table>"
        f"<h2>Failures</h2>{failures_html}{missing_html}"
        f"<h2>Most frequent harmful training images</h2><p>How often each training image is among the top "
        f"{ranking.harmful_index.shape[1]} harmful of a test image.</p>"
        f"<table><tr><th>times</th><th>training image</th><th>per folder</th></tr>{frequent_rows}</table>"
        f"<h2>Settings</h2><pre>{_e(json.dumps(header['settings'], indent=2, sort_keys=True))}</pre>"
        f"<h2>Versions</h2><pre>{_e(json.dumps(header['versions'], indent=2, sort_keys=True))}</pre>"
        f"<p>{_e(header['sign_convention'])}</p>"
    )
    front = output_dir / "index.html"
    outputs.write_with(front, lambda file: file.write(_page("Influence results", body)), mode="w")
    return front


def _failure_table(failures: dict, rows, output_dir: Path, prefix: str) -> str:
    body = ""
    for i in rows:
        record = str(failures["record_file"][i])
        link = f"<a href=\"{_href(prefix + record)}\">record</a>" if record and (output_dir / record).is_file() else ""
        body += (f"<tr><td>{_e(failures['folder'][i])}</td><td>{failures['label'][i]}</td>"
                 f"<td>{failures['number'][i]}</td><td>{_e(failures['test_id'][i])}</td>"
                 f"<td>{_e(failures['reason'][i])}</td><td>{link}</td></tr>")
    return ("<table><tr><th>folder</th><th>label</th><th>#</th><th>test image</th><th>reason</th><th></th></tr>"
            f"{body}</table>")
