"""``cmscale data encode``: an image set -> EDM2's latent zip, in resumable parts across array tasks.

The output is what EDM2's ``dataset_tool.py encode`` writes: ``00000/img-mean-std-00000000.npy``
(float32 ``2C x H/8 x W/8``, the posterior's mean then std, item i from source image i in sorted
order) and ``dataset.json`` with the source's labels under the new names (or ``null``).

A million images are encoded in parts of ``chunk`` images: part c is written to
``OUT.parts/part-<c>.zip`` (atomically: a temporary file, then a rename) by shard ``c % n``, so
``--shard i/n`` tasks of an array job share the work, a task that is killed and started again
skips the parts already written, and ``merge_parts`` copies the parts' members (bytes unchanged)
into ``OUT`` once every part exists.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from cmscale.data.archive import LABELS_FILE, PIXELS, ArchiveDataset, DataFormatError

DEFAULT_CHUNK = 1000
MANIFEST = "manifest.json"


def latent_member(index: int) -> str:
    text = f"{index:08d}"
    return f"{text[:5]}/img-mean-std-{text}.npy"


def parts_dir(out: Path | str) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def part_path(out: Path | str, chunk_index: int) -> Path:
    return parts_dir(out) / f"part-{chunk_index:06d}.zip"


def _manifest(source: ArchiveDataset, chunk: int) -> dict:
    return {"source": str(source.path.resolve()), "num_images": len(source), "chunk": chunk,
            "item_shape": list(source.item_shape)}


def _check_manifest(out: Path, expected: dict) -> None:
    path = parts_dir(out) / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != expected:
            raise DataFormatError(f"{path}: these parts were encoded from {found.get('source')} "
                                  f"({found.get('num_images')} images, chunk {found.get('chunk')}), not "
                                  f"{expected['source']} ({expected['num_images']} images, chunk {expected['chunk']}); "
                                  "use another --out or delete that folder")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(expected))
    os.replace(tmp, path)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write it as INDEX/COUNT, e.g. 3/16 (INDEX from 0)") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: INDEX must lie in [0, COUNT)")
    return index, count


def open_source(images: Path | str, downsampling: int = 1) -> ArchiveDataset:
    source = ArchiveDataset(images)
    if source.kind != PIXELS or source.item_shape[0] != 3:
        raise DataFormatError(f"{images}: `cmscale data encode` reads RGB images, but this set holds "
                              f"{source.kind} of shape {'x'.join(map(str, source.item_shape))}")
    if source.resolution % downsampling or source.item_shape[1] % downsampling:
        raise DataFormatError(f"{images}: the VAE downsamples by {downsampling}, but the images are "
                              f"{source.item_shape[1]}x{source.item_shape[2]}; resize them to a multiple of "
                              f"{downsampling}")
    return source


def encode_parts(images: Path | str, codec, out: Path | str, shard: tuple[int, int] = (0, 1),
                 chunk: int = DEFAULT_CHUNK, log=None) -> list[int]:
    """Encode this shard's parts that are not on disk yet; returns the part indices written."""
    out, source = Path(out), open_source(images, codec.downsampling)
    _check_manifest(out, _manifest(source, chunk))
    index, count = shard
    written = []
    for chunk_index in range(index, -(-len(source) // chunk), count):
        path = part_path(out, chunk_index)
        if path.is_file():
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        start, stop = chunk_index * chunk, min(len(source), (chunk_index + 1) * chunk)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for first in range(start, stop, codec.batch_size):
                items = range(first, min(stop, first + codec.batch_size))
                pixels = torch.from_numpy(np.stack([source[i] for i in items]))
                for item, mean_std in zip(items, codec.encode_pixels(pixels).cpu().numpy()):
                    buffer = io.BytesIO()
                    np.save(buffer, mean_std)
                    archive.writestr(latent_member(item), buffer.getvalue())
        os.replace(tmp, path)
        written.append(chunk_index)
        if log is not None:
            log(f"part {chunk_index}: images {start}..{stop - 1} -> {path}")
    return written


def missing_parts(images: Path | str, out: Path | str, chunk: int = DEFAULT_CHUNK) -> list[int]:
    source = ArchiveDataset(images)
    return [c for c in range(-(-len(source) // chunk)) if not part_path(out, c).is_file()]


def merge_parts(images: Path | str, out: Path | str, chunk: int = DEFAULT_CHUNK) -> Path:
    """Copy every part's latents into ``out`` with the source's labels; refuses while parts are missing."""
    out, source = Path(out), open_source(images)
    _check_manifest(out, _manifest(source, chunk))
    missing = missing_parts(images, out, chunk)
    if missing:
        shown = ", ".join(str(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataFormatError(f"{parts_dir(out)}: {len(missing)} of {-(-len(source) // chunk)} parts are not "
                              f"encoded yet (parts {shown}; part c belongs to shard c % n): run the shards that "
                              "own them again (finished parts are skipped), then merge")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as merged:
        for chunk_index in range(-(-len(source) // chunk)):
            with zipfile.ZipFile(part_path(out, chunk_index)) as part:
                for info in sorted(part.infolist(), key=lambda info: info.filename):
                    merged.writestr(info.filename, part.read(info))
        labels = None if source.labels is None else [[latent_member(i), int(label)]
                                                     for i, label in enumerate(source.labels)]
        merged.writestr(LABELS_FILE, json.dumps({"labels": labels}))
    os.replace(tmp, out)
    return out
