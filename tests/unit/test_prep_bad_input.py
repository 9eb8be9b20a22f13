"""`ithaca prep` on input that is not readable text: each fault written for real, then either one
line naming it (the default, nothing presented as output) or, with on_error="skip", left out and
counted in manifest.json, also across an interrupted and resumed prep."""

from __future__ import annotations

import gzip
import json
import re
import sys

import numpy as np
import pytest

from ithaca.data import ByteTokenizer, prep, read_manifest
from ithaca.data.input_errors import MAX_LISTED, read_skip_log
from ithaca.data.inputs import expand_inputs
from ithaca.data.shard_reader import read_shard
from ithaca.launcher.cli.main import main

from test_prep import InterruptingTokenizer

GOOD = ["a good text file\n", "good line one", "good line two"]


def stored_documents(folder) -> list[str]:
    manifest = read_manifest(folder)
    return [bytes(d.astype(np.uint8)).decode() for s in manifest.shards for d in read_shard(folder, s)]


def jsonl(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def truncated_gzip(path):
    whole = gzip.compress(jsonl(*(f"line {i} " * 20 for i in range(200))))
    path.write_bytes(whole[:len(whole) // 2])


def gzip_with_a_bad_crc(path):
    """Every line decompresses; only the CRC at the end shows the corruption."""
    whole = bytearray(gzip.compress(jsonl("looks fine", "until the end")))
    whole[-8] ^= 0xFF  # the trailer is CRC32 then the length, little-endian
    path.write_bytes(bytes(whole))


def not_gzip_at_all(path):
    path.write_bytes(jsonl("plain JSONL named .gz"))


def binary(path):
    path.write_bytes(bytes(range(256)) * 4)


def latin1(path):
    path.write_bytes("first line\ncafé in Latin-1\n".encode("latin-1"))


def broken_link(path):
    path.symlink_to(path.parent / "nowhere")


def no_permission(path):
    path.write_text("secret")
    path.chmod(0)
    try:
        path.open("rb").close()
    except PermissionError:
        return
    pytest.skip("this user reads a chmod 000 file (root); the broken link covers unreadable files")


FILE_FAULTS = [  # (write the fault, its file name, kind, what the line says)
    (truncated_gzip, "cut.jsonl.gz", "gzip", "corrupt or truncated gzip (Compressed file ended"),
    (gzip_with_a_bad_crc, "crc.jsonl.gz", "gzip", "corrupt or truncated gzip (CRC check failed"),
    (not_gzip_at_all, "plain.txt.gz", "gzip", "corrupt or truncated gzip (Not a gzipped file"),
    (binary, "image.txt", "binary", "binary, not text (NUL byte at offset 0)"),
    (latin1, "latin1.md", "utf8", "not UTF-8 (byte 0xe9 on line 2)"),
    (broken_link, "link.txt", "unreadable", "cannot read (No such file or directory)"),
    (no_permission, "locked.txt", "unreadable", "cannot read (Permission denied)"),
]


@pytest.fixture
def folder(tmp_path):
    """Good input: one text file and one JSONL file, to be read around the fault."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(GOOD[0])
    (folder / "z.jsonl").write_bytes(jsonl(*GOOD[1:]))
    return folder


@pytest.mark.parametrize("write, name, kind, reason", FILE_FAULTS)
def test_a_bad_file_stops_the_prep_naming_it(folder, tmp_path, write, name, kind, reason):
    write(folder / name)
    with pytest.raises(ValueError, match=re.escape(f"{folder / name}: {reason}")) as err:
        prep(expand_inputs([folder]), tmp_path / "out", ByteTokenizer())
    assert "\n" not in str(err.value) and str(err.value).endswith("; fix it or pass --on-error skip")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("write, name, kind, reason", FILE_FAULTS)
def test_a_bad_file_is_skipped_whole_and_counted(folder, tmp_path, write, name, kind, reason):
    write(folder / name)
    manifest = prep(expand_inputs([folder]), tmp_path / "out", ByteTokenizer(), on_error="skip")
    assert stored_documents(tmp_path / "out") == GOOD  # nothing of the bad file, not even a first line
    assert manifest.documents == len(GOOD)
    skipped = read_skip_log(tmp_path / "out")
    assert (skipped.files, skipped.lines, skipped.by_kind) == (1, 0, {kind: 1})
    [listed] = skipped.listed
    assert (listed.path, listed.line, listed.kind) == (str(folder / name), None, kind)
    assert listed.reason.startswith(reason)


def test_a_file_that_vanished_after_listing(folder, tmp_path):
    (folder / "gone.txt").write_text("deleted before prep reads it")
    files = expand_inputs([folder])
    (folder / "gone.txt").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'gone.txt'}: cannot read (No such file")):
        prep(files, tmp_path / "out", ByteTokenizer())
    prep(files, tmp_path / "skipped", ByteTokenizer(), on_error="skip")
    assert read_skip_log(tmp_path / "skipped").by_kind == {"unreadable": 1}


LINE_FAULTS = [  # (the bad line, kind, what the line says)
    (b"{not json\n", "json", "not JSON (Expecting property name enclosed in double quotes at column 2)"),
    (b'{"body": "the wrong field"}\n', "field", "not a JSON object with a string field 'text'"),
    (b'["text", "an array"]\n', "field", "not a JSON object with a string field 'text'"),
    (b'{"text": 42}\n', "field", "field 'text' is 42, not a string"),
    (b'{"text": "caf\xe9"}\n', "utf8", "not UTF-8 (byte 0xe9 at column 14)"),
    (b'{"text": "a\x00b"}\n', "binary", "binary, not text (NUL byte)"),
]


@pytest.mark.parametrize("line, kind, reason", LINE_FAULTS)
def test_a_bad_jsonl_line_stops_the_prep_naming_file_and_line(folder, tmp_path, line, kind, reason):
    (folder / "z.jsonl").write_bytes(jsonl(GOOD[1]) + b"\n" + line + jsonl(GOOD[2]))  # line 3, after a blank
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'z.jsonl'}:3: {reason}; fix it")):
        prep(expand_inputs([folder]), tmp_path / "out", ByteTokenizer(), workers=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, kind, reason", LINE_FAULTS)
def test_a_bad_jsonl_line_is_skipped_and_counted(folder, tmp_path, line, kind, reason):
    (folder / "z.jsonl").write_bytes(jsonl(GOOD[1]) + b"\n" + line + jsonl(GOOD[2]))
    prep(expand_inputs([folder]), tmp_path / "out", ByteTokenizer(), workers=2, on_error="skip")
    assert stored_documents(tmp_path / "out") == GOOD  # the lines around it are kept
    skipped = read_skip_log(tmp_path / "out")
    assert (skipped.files, skipped.lines, skipped.by_kind) == (0, 1, {kind: 1})
    assert [(b.path, b.line, b.reason) for b in skipped.listed] == [(str(folder / "z.jsonl"), 3, reason)]


def test_the_list_of_skipped_inputs_is_bounded_and_the_counts_are_not(folder, tmp_path):
    (folder / "z.jsonl").write_bytes(b"not json\n" * (MAX_LISTED + 5) + jsonl("kept"))
    prep(expand_inputs([folder]), tmp_path / "out", ByteTokenizer(), on_error="skip")
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]
    assert (raw["lines"], raw["by_kind"], len(raw["listed"]), raw["unlisted"]) == \
        (MAX_LISTED + 5, {"json": MAX_LISTED + 5}, MAX_LISTED, 5)
    assert raw["listed"][-1]["line"] == MAX_LISTED


def test_cli_stops_with_one_line_and_exit_1(folder, tmp_path, capsys):
    truncated_gzip(folder / "cut.jsonl.gz")
    out = tmp_path / "out"
    assert main(["prep", "--input", str(folder), "--output", str(out), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err == f"ithaca: {folder / 'cut.jsonl.gz'}: corrupt or truncated gzip (Compressed file ended before " \
                  "the end-of-stream marker was reached); fix it or pass --on-error skip\n"
    assert not out.exists()


def test_cli_skip_reports_the_skips_in_its_summary_line(folder, tmp_path, capsys):
    binary(folder / "image.txt")
    (folder / "z.jsonl").write_bytes(jsonl(GOOD[1]) + b"{oops\n" + b'{"title": "x"}\n' + jsonl(GOOD[2]))
    out = tmp_path / "out"
    assert main(["prep", "--input", str(folder), "--output", str(out), "--workers", "2", "--on-error", "skip"]) == 0
    assert capsys.readouterr().out == (f"wrote 1 shards, 3 documents, {sum(len(g) for g in GOOD)} tokens to {out}; "
                                       "skipped 1 file(s) and 2 JSONL line(s) (binary=1, field=1, json=1)\n")
    assert stored_documents(out) == GOOD


def test_nothing_but_bad_input_is_refused(tmp_path):
    binary(tmp_path / "image.txt")
    with pytest.raises(ValueError, match=re.escape("--input: 1 file(s) hold no text to tokenize "
                                                   "(skipped 1 file(s) and 0 JSONL line(s) (binary=1))")):
        prep([tmp_path / "image.txt"], tmp_path / "out", ByteTokenizer(), on_error="skip")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_batches(monkeypatch):
    """Many tokenizer tasks for a small input, so an interruption falls after finished shards and
    the reader runs ahead of the writer (a name the `prep` function shadows in ithaca.data)."""
    monkeypatch.setattr(sys.modules["ithaca.data.prep"], "BATCH_BYTES", 500)


@pytest.mark.parametrize("after", [60, 172, 330])
def test_an_interrupted_skipping_prep_resumes_without_counting_a_skip_twice(tmp_path, small_batches, after):
    """Bad lines every few documents and a bad file in the middle, interrupted in the first file,
    the second (skipped whole) having been read, or the third."""
    folder = tmp_path / "in"
    folder.mkdir()
    for part in ("a", "c"):
        lines = [jsonl(f"{part} document {i}: " + "abc " * (i % 23)) if i % 7 else b"{broken\n" for i in range(200)]
        (folder / f"{part}.jsonl").write_bytes(b"".join(lines))
    truncated_gzip(folder / "b.jsonl.gz")
    files = expand_inputs([folder])
    prep(files, tmp_path / "whole", ByteTokenizer(), shard_tokens=2000, on_error="skip")
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prep(files, out, InterruptingTokenizer(after=after), shard_tokens=2000, on_error="skip")
    journal = json.loads((tmp_path / ".resumed.partial" / "prep-journal.json").read_text())
    assert journal["skipped"]["lines"] > 0  # skips before the interruption come back from the journal
    prep(files, out, ByteTokenizer(), shard_tokens=2000, on_error="skip", workers=2)
    assert (out / "manifest.json").read_text() == (tmp_path / "whole" / "manifest.json").read_text()
    assert read_skip_log(out).by_kind == {"json": 2 * 29, "gzip": 1}  # i % 7 == 0 for 29 of 0..199


def test_a_rerun_with_the_other_on_error_starts_over(tmp_path, folder, small_batches):
    (folder / "z.jsonl").write_bytes(b"{broken\n" + jsonl(*(f"document {i}" for i in range(300))))
    files = expand_inputs([folder])
    with pytest.raises(KeyboardInterrupt):
        prep(files, tmp_path / "out", InterruptingTokenizer(after=200), shard_tokens=500, on_error="skip")
    assert len(list((tmp_path / ".out.partial").glob("shard-*.tar"))) > 1  # a resume would start past line 1
    with pytest.raises(ValueError, match="z.jsonl:1: not JSON"):
        prep(files, tmp_path / "out", ByteTokenizer(), shard_tokens=500)
