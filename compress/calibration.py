"""Calibration data: a text file, JSON lines with a text field, a local `datasets` folder, or a built-in corpus.

Sampling is deterministic by seed; memory is bounded by num_samples x seq_len token ids (never by the model's
maximum positions). The hash of the exact token ids used goes into the checkpoint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError

from .errors import CalibrationError, CompressError, ConfigError
from .paths import user_path
from .strict_config import StrictConfig

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_TEXTS = {"builtin:calibration": "calibration.txt", "builtin:heldout": "heldout.txt"}


class CalibrationSpec(StrictConfig):
    model_config = ConfigDict(**StrictConfig.model_config, validate_assignment=True)

    def __setattr__(self, name: str, value) -> None:
        """`spec.num_samples = -5` is checked as the constructor checks it (it failed later in torch)."""
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError("\n".join(f"calibration: {name} = {value!r}: {e['msg']}" for e in exc.errors())) from None

    source: str = "builtin:calibration"
    text_field: str = "text"
    split: str = "train"
    num_samples: int = Field(64, ge=1, le=100_000)
    seq_len: int = Field(256, ge=8, le=131_072)
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1)  # the range torch generators take
    # "recipe.yaml:LINE:COL" of seq_len (or of the section) in a recipe: errors found once the model is known
    _location: str = PrivateAttr("")


def builtin_text(name: str, model: str = "tiny") -> str:
    return (BUILTIN_DIR / model / BUILTIN_TEXTS[name]).read_text(encoding="utf-8")


def source_path(source: str, base_dir: Path | None = None) -> Path:
    """A local calibration source: as given, else relative to the recipe's folder (`base_dir`); CalibrationError
    when neither exists."""
    try:
        path = user_path(source)
    except CompressError as exc:  # (said at the recipe's line)
        raise CalibrationError(f"calibration source {exc}") from None
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.exists():
        raise CalibrationError(f"calibration source {source} does not exist; give a text file, a .jsonl file, "
                               "a local datasets folder, or builtin:calibration")
    if not (path.is_file() or path.is_dir()):  # a pipe blocked the run forever, /dev/zero filled the memory
        raise CalibrationError(f"calibration source {source} is not a regular file (a device or pipe); give a text "
                               "file, a .jsonl file or a local datasets folder")
    return path


def read_texts(spec: CalibrationSpec, base_dir: Path | None = None) -> list[str]:
    """The documents of a calibration source, in file order."""
    if spec.source in BUILTIN_TEXTS:
        return [builtin_text(spec.source)]
    if spec.source.startswith("builtin:"):
        raise CalibrationError(f"unknown built-in corpus {spec.source!r}; use one of {', '.join(BUILTIN_TEXTS)}")
    path = source_path(spec.source, base_dir)
    if path.is_dir():
        return _read_dataset_folder(path, spec)
    suffix = path.suffix.lower()  # (DATA.JSONL was read as plain text: calibrated on the JSON syntax)
    if suffix == ".json":
        whole = _whole_json(path, spec.text_field)
        if whole is not None:
            return whole
    if suffix in (".jsonl", ".json", ".ndjson"):
        texts = []
        # utf-8-sig: a leading byte-order mark, as editors write it (refused as invalid JSON before)
        with path.open(encoding="utf-8-sig", errors="replace") as f:  # a stray byte is replaced, like in .txt
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if isinstance(row, str):  # a line that is a JSON string: the text itself
                    texts.append(row)
                    continue
                if not isinstance(row, dict) or spec.text_field not in row:
                    raise CalibrationError(f"{path}:{lineno}: no {spec.text_field!r} field; set calibration.text_field")
                texts.append(_text_value(row[spec.text_field], f"{path}:{lineno}", spec.text_field))
        return texts
    return [_read_text_file(path)]


def _text_value(value, where: str, field: str) -> str:
    """A record's text field, which must be a string: null, a list or a mapping was calibrated on as its Python
    spelling ("None<|endoftext|>None...")."""
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: {field!r} is {'null' if value is None else type(value).__name__}, not a "
                               "string")
    return value


def _whole_json(path: Path, field: str) -> list[str] | None:
    """A .json file that is one JSON document: a list of records with `field` (or of strings), or one record;
    None when it is not one document (then it is read as JSON lines, one record per line)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig", errors="replace"))
    except json.JSONDecodeError:
        return None
    rows = doc if isinstance(doc, list) else [doc]
    texts = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict) and field in row:
            texts.append(_text_value(row[field], f"{path}: record {i}" if isinstance(doc, list) else str(path), field))
        else:
            where = f"record {i}" if isinstance(doc, list) else "its record"
            raise CalibrationError(f"{path}: {where} has no {field!r} field; set calibration.text_field")
    return texts


def _read_text_file(path: Path) -> str:
    """The file as UTF-8 text (a stray byte replaced), refused when it is not text at all: a NUL byte, or more than
    1% of its characters undecodable (a weights file or an archive named as the source calibrated on junk)."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if b"\x00" in data or bad > 0.01 * max(len(text), 1):
        why = "a NUL byte" if b"\x00" in data else f"{bad} of its {len(text)} characters are not UTF-8"
        raise CalibrationError(f"calibration source {path} is not a text file ({why}); give a text file, a .jsonl "
                               "file or a datasets folder")
    return text


def _read_dataset_folder(path: Path, spec: CalibrationSpec) -> list[str]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise CalibrationError(f"{path} is a folder: reading a local datasets folder needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CalibrationError(f"{path} is a folder but not a datasets folder written by `save_to_disk` "
                               f"({str(exc).splitlines()[0][:120]}); give a text or .jsonl file instead") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise CalibrationError(f"{path} has splits {list(ds)}; set calibration.split to one of them")
        ds = ds[spec.split]
    if spec.text_field not in ds.column_names:
        raise CalibrationError(f"{path} has columns {ds.column_names}; set calibration.text_field to the text column")
    return [_text_value(t, f"{path}: row {i}", spec.text_field) for i, t in enumerate(ds[spec.text_field])]


def build_batches(spec: CalibrationSpec, tokenizer, base_dir: Path | None = None, say=None) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens, drawn at seeded random offsets from the concatenated documents;
    `say(line)` is told when they hold each token of the text several times over (2000 x 1024 tokens of a 50k-token
    text: the statistics of 50k tokens, at 40 times the cost, said nowhere)."""
    ids, offsets = window_offsets(spec, tokenizer, base_dir)
    drawn = spec.num_samples * spec.seq_len
    if say is not None and drawn > 4 * ids.numel():
        say(f"calibration draws {drawn:,} tokens from a text of {ids.numel():,} ({spec.source}): each token about "
            f"{drawn / ids.numel():.0f} times; fewer num_samples cost less for the same statistics, or give more text")
    return torch.stack([ids[o : o + spec.seq_len] for o in offsets.tolist()])


def window_offsets(spec: CalibrationSpec, tokenizer, base_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the concatenated documents' token ids, the `num_samples` seeded window starts in them): `build_batches`'s
    windows without building them, for a training set of millions of windows (8 bytes each, not 8 x seq_len)."""
    texts = read_texts(spec, base_dir)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    words = 0  # tokens of text, not counting the separators added here
    needed = spec.num_samples * spec.seq_len * 4  # enough text for distinct windows; bounds tokenization work
    # documents in a seeded order: in file order, a large source gave only its first documents (the first 1% of a
    # corpus sorted by topic or date), where GPTQ's and SparseGPT's code sample across the whole set
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(spec.seed)).tolist() \
        if len(texts) > 1 else range(len(texts))
    for text in (texts[i] for i in order):
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids.extend(tokens)
        words += len(tokens)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    if not words:
        raise CalibrationError(f"calibration source {spec.source} holds no text; give a file with text in it")
    if len(ids) < spec.seq_len + 1:
        raise CalibrationError(
            f"calibration source {spec.source} has {len(ids)} tokens, fewer than seq_len={spec.seq_len}; "
            "give more text or lower calibration.seq_len"
        )
    all_ids = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(spec.seed)
    return all_ids, torch.randint(0, all_ids.numel() - spec.seq_len + 1, (spec.num_samples,), generator=gen)


def batches_hash(batches: torch.Tensor) -> str:
    return hashlib.sha256(batches.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


# A sketch of the text a run calibrated or trained on, kept in the checkpoint so that an evaluation can say when the
# text it scores is that text (which flatters every number): the token n-grams whose hash is 0 modulo `modulus`
# (chosen by content, so the same n-grams are picked in any text, wherever its windows start), the modulus doubling
# until at most SKETCH_MAX remain. An evaluation picks its own n-grams by the same rule: the share of them found in
# the sketch is the share of the scored text the calibration drew from.
# 2048 ids as one hex string: 16 KB in config.json. The modulus grows with the text: a sketch of N tokens picks about
# one n-gram in N / 2048, so an evaluation of E tokens finds about 2048 E / N of them (50k scored tokens against a
# 20M-token training set: 5, still said; the check needs 2).
SKETCH_NGRAM, SKETCH_MAX, _FIRST_MODULUS = 16, 2048, 64
_HASH_MULTIPLIERS = (torch.randint(1, 2**62, (SKETCH_NGRAM,), generator=torch.Generator().manual_seed(0)) | 1).tolist()


def ngram_hashes(ids: torch.Tensor) -> torch.Tensor:
    """64-bit hashes of every run of SKETCH_NGRAM consecutive tokens in each row of `ids` (1-D: one row),
    flattened. Integer products wrap modulo 2^64, which is the hash's arithmetic."""
    ids = _as_rows(ids)
    n = ids.shape[1] - SKETCH_NGRAM + 1
    if n <= 0:
        return torch.empty(0, dtype=torch.int64)
    h = torch.zeros(ids.shape[0], n, dtype=torch.int64)
    for j, m in enumerate(_HASH_MULTIPLIERS):
        h += ids[:, j:j + n] * m
    h ^= h >> 29
    return (h * 0x2545F4914F6CDD1D).flatten()


def _as_rows(ids: torch.Tensor) -> torch.Tensor:
    """Token ids as int64 rows: windows [n, len] as they are, 1-D text as one row."""
    return ids.to(torch.int64).reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.to(torch.int64).reshape(1, -1)


def window_coverage(length: int, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A bool per token of a text of `length` tokens: inside one of the windows of `seq_len` starting at `offsets`."""
    edges = torch.zeros(length + 1, dtype=torch.int32)
    edges.index_add_(0, offsets, torch.ones_like(offsets, dtype=torch.int32))
    edges.index_add_(0, (offsets + seq_len).clamp(max=length), -torch.ones_like(offsets, dtype=torch.int32))
    return edges.cumsum(0)[:-1] > 0


def _ids(hashes: torch.Tensor) -> torch.Tensor:
    """The upper 32 bits of n-gram hashes: what a sketch stores, and what its rule tests (id % modulus == 0), so a
    stored sketch can be thinned further when it is merged with another."""
    return (hashes >> 32) & 0xFFFFFFFF


def _sketch_ids(sketch: dict | None) -> torch.Tensor:
    text = (sketch or {}).get("hashes", "")
    return torch.tensor([int(text[i:i + 8], 16) for i in range(0, len(text), 8)], dtype=torch.int64)


def text_sketch(ids: torch.Tensor, previous: dict | None = None, covered: torch.Tensor | None = None) -> dict:
    """The sketch of token ids `ids` (rows of windows, or one long row), merged with an earlier one (`previous`);
    `covered` (1-D `ids` only: a bool per token) keeps the n-grams inside the spans a run used (a training set's
    windows cover part of the text it read)."""
    if previous is not None and previous.get("ngram") != SKETCH_NGRAM:
        previous = None  # another kind of sketch cannot be merged: this run's text alone
    modulus = max(_FIRST_MODULUS, int((previous or {}).get("modulus", _FIRST_MODULUS)))
    kept = _sketch_ids(previous)
    for row in _as_rows(ids):  # a training set of millions of tokens is one long row: hashed in pieces
        for at in range(0, row.numel(), 1 << 20):
            end = at + (1 << 20) + SKETCH_NGRAM - 1
            piece = _ids(ngram_hashes(row[at:end]))
            if covered is not None and piece.numel():  # n-grams whose every token lies in a used span
                outside = torch.cat([torch.zeros(1, dtype=torch.int64), (~covered[at:end]).cumsum(0)])
                piece = piece[(outside[SKETCH_NGRAM:] - outside[:-SKETCH_NGRAM]) == 0]
            kept = torch.unique(torch.cat([kept, piece[piece % modulus == 0]]))
            while kept.numel() > SKETCH_MAX:
                modulus *= 2
                kept = kept[kept % modulus == 0]
    return {"ngram": SKETCH_NGRAM, "modulus": modulus, "hashes": "".join(f"{int(h):08x}" for h in kept)}


def sketch_overlap(sketch: dict | None, windows: torch.Tensor) -> tuple[float, int] | None:
    """(share of `windows`' picked n-grams found in a calibration `sketch`, how many were picked), or None when the
    sketch is of another kind or the windows pick none."""
    if not isinstance(sketch, dict) or sketch.get("ngram") != SKETCH_NGRAM or not sketch.get("hashes"):
        return None
    picked = torch.unique(_ids(ngram_hashes(windows)))
    picked = picked[picked % int(sketch["modulus"]) == 0]
    if not picked.numel():
        return None
    found = torch.isin(picked, _sketch_ids(sketch))
    return float(found.float().mean()), int(picked.numel())
