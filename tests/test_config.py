"""params.yaml loading: every bad key or value fails before any work, naming the key."""

from __future__ import annotations

import pytest
from conftest import REPO, write_params

from lmline import config
from lmline.config import ConfigError

MINIMAL = {"ingest": {"sources": [{"name": "docs", "type": "text_files", "path": "corpus/docs/*.txt"}]}}


def test_repo_params_load_with_the_default_sources():
    params = config.load(REPO / "params.yaml")
    names = {s.name: s.role for s in params.ingest.sources}
    assert names == {"shakespeare": "pretrain", "news": "pretrain", "rotten_tomatoes": "finetune"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("clean.min_chars=-5", "params.yaml: clean.min_chars must be >= 0 (got -5)"),
        ("clean.no_such_key=1", "params.yaml: clean.no_such_key is not a known key"),
        ("pretrain.lr=fast", "params.yaml: pretrain.lr input should be a valid number"),
        ("pretrain.arch=rnn", "params.yaml: pretrain.arch must be one of 'llama' or 'gpt2' (got 'rnn')"),
        ("typo_section.x=1", "params.yaml: typo_section is not a known key"),
    ],
)
def test_bad_values_name_the_key(make_params, override, message):
    _, path = make_params(MINIMAL)
    with pytest.raises(ConfigError) as exc:
        config.load(path, [override])
    assert str(exc.value).startswith(message)


def test_bad_source_entries_name_the_list_index(workspace):
    sources = [MINIMAL["ingest"]["sources"][0], {"name": "x", "type": "jsonl"}]
    path = write_params(workspace / "params.yaml", {"ingest": {"sources": sources}})
    with pytest.raises(ConfigError, match=r"^params.yaml: ingest.sources\[1\].path is required$"):
        config.load(path)
    write_params(path, {"ingest": {"sources": [{"name": "x", "type": "ftp", "path": "a"}]}})
    with pytest.raises(ConfigError, match=r"ingest.sources\[0\] has an unknown type"):
        config.load(path)


def test_cross_field_rules(make_params):
    _, path = make_params(MINIMAL)
    with pytest.raises(ConfigError, match=r"pretrain: d_model \(100\) must be divisible by n_head \(3\)"):
        config.load(path, ["pretrain.d_model=100", "pretrain.n_head=3"])
    with pytest.raises(ConfigError, match="clean.filters.nope names no source"):
        config.load(path, {"clean.filters": {"nope": {}}})
    with pytest.raises(ConfigError, match="val \\+ test must be < 1"):
        config.load(path, ["clean.split.val=0.6", "clean.split.test=0.5"])


def test_devices_fit_the_gpu_pool_in_distributed_mode(make_params):
    _, path = make_params(MINIMAL)
    with pytest.raises(ConfigError, match=r"^params.yaml: pretrain.devices must be >= 1 \(got 0\)$"):
        config.load(path, ["pretrain.devices=0"])
    two_gpus = ["orchestration.mode=distributed", "orchestration.work_pools.gpu_devices='0,1'"]
    assert config.load(path, [*two_gpus, "pretrain.devices=2", "finetune.devices=2"]).pretrain.devices == 2
    with pytest.raises(
        ConfigError,
        match=r"finetune.devices \(3\) exceeds the GPUs the gpu pool gives a stage: "
        r"orchestration.work_pools.gpu_devices lists 2",
    ):
        config.load(path, [*two_gpus, "finetune.devices=3"])
    # a stage routed to cpu, or local mode, is not bound by the gpu pool's devices
    on_cpu = config.load(path, [*two_gpus, "finetune.devices=3", "orchestration.pools.finetune=cpu"])
    assert on_cpu.finetune.devices == 3
    assert config.load(path, ["pretrain.devices=4"]).pretrain.devices == 4


def test_overrides_are_parsed_as_yaml_and_malformed_ones_rejected(make_params):
    _, path = make_params(MINIMAL)
    params = config.load(path, ["pretrain.lr=1e-3", "pretrain.compile=true"])
    assert params.pretrain.lr == pytest.approx(1e-3) and params.pretrain.compile is True
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        config.load(path, ["pretrain.lr"])


def test_missing_and_invalid_files(workspace):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        config.load(workspace / "nope.yaml")
    bad = workspace / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: line 2 is not valid YAML"):
        config.load(bad)


def test_flatten_gives_dotted_keys():
    params = config.load(REPO / "params.yaml")
    flat = config.flatten(params.tokenize, "tokenize.")
    assert flat["tokenize.vocab_size"] == params.tokenize.vocab_size


def test_cli_rejects_bad_params_before_any_work(make_params, workspace):
    from typer.testing import CliRunner

    from lmline.cli import app

    _, path = make_params(MINIMAL)
    result = CliRunner().invoke(app, ["stage", "ingest", "--params", str(path), "--set", "clean.min_chars=-5"])
    assert result.exit_code == 1
    assert "params.yaml: clean.min_chars must be >= 0 (got -5)" in result.output
    assert not (workspace / "data").exists() and not (workspace / "mlruns").exists()


@pytest.mark.parametrize("path", ["elsewhere/*.txt", "/abs/docs.txt", "corpus/../x.txt"])
def test_local_sources_must_live_in_the_corpus_dir_dvc_tracks(workspace, path):
    sources = [{"name": "d", "type": "text_files", "path": path}]
    write_params(workspace / "params.yaml", {"ingest": {"sources": sources}})
    with pytest.raises(ConfigError, match=r"ingest.sources\[0\].path must lie inside paths.corpus \(corpus/\)"):
        config.load(workspace / "params.yaml")
