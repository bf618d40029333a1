"""No value or command can lose data: paths.* are checked before any work, atomic_path only ever
removes its own temp folder, snapshots never commit untracked files, and `data add` is all or nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import make_dvc_repo, tiny_params, write_tiny_corpus

from lmline import config
from lmline.config import ConfigError
from lmline.errors import LmlineError

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t.invalid",
}


# Content-addressed stores and lock files: written to by reads and failed attempts, lose nothing.
CACHES = (".git/objects", ".dvc/cache", ".dvc/tmp")


def tree_state(root: Path) -> dict[str, bytes]:
    """Every file under `root` (.git included, its object store not) with its bytes."""
    return {
        rel: p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (rel := p.relative_to(root).as_posix()).startswith(CACHES)
    }


def sh(root: Path, *cmd: str) -> str:
    out = subprocess.run(cmd, cwd=root, env={**os.environ, **GIT_ENV}, check=True, capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------- paths.* before any work
@pytest.mark.parametrize(
    "override, message",
    [
        ("paths.raw=corpus", "params.yaml: paths.raw must not be paths.corpus or lie inside it (got 'corpus')"),
        ("paths.raw=corpus/raw", "paths.raw must not be paths.corpus or lie inside it (got 'corpus/raw')"),
        ("paths.corpus=data", "paths.corpus must not contain paths.raw ('data/raw') (got 'data')"),
        ("paths.raw=.", "paths.raw must name a folder inside the workspace, not the workspace itself (got '.')"),
        ("paths.raw=''", "paths.raw must name a folder inside the workspace, not the workspace itself (got '')"),
        (
            "paths.tokens=./",
            "paths.tokens must name a folder inside the workspace, not the workspace itself (got './')",
        ),
        ("paths.clean=data/raw", "paths.clean must not be paths.raw or lie inside it (got 'data/raw')"),
        (
            "paths.metrics=models",
            "paths.metrics must not contain paths.pretrain_model ('models/pretrain') (got 'models')",
        ),
        ("paths.raw=/tmp/raw", "paths.raw must be relative to the workspace (got '/tmp/raw')"),
        ("paths.raw=data/../../raw", "paths.raw must stay inside the workspace, without '..' (got 'data/../../raw')"),
        ("paths.reports=.git", "paths.reports must not be .git or .dvc or lie inside them (got '.git')"),
        ("paths.plots=.dvc/plots", "paths.plots must not be .git or .dvc or lie inside them (got '.dvc/plots')"),
        ("paths.reports=params.yaml", "paths.reports must not be params.yaml or lie inside it"),
    ],
)
def test_a_path_that_could_lose_data_is_refused_naming_its_key(make_params, override, message):
    _, path = make_params(tiny_params())
    with pytest.raises(ConfigError) as exc:
        config.load(path, [override])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_separate_paths_inside_the_workspace_are_accepted(make_params):
    _, path = make_params(tiny_params())
    params = config.load(
        path,
        [
            "paths.raw=data/raw-v2",
            "paths.tokens=data/tok",
            "paths.corpus=./my-corpus",
            "ingest.sources=[{name: d, type: text_files, path: my-corpus/d/*.txt}]",
        ],
    )
    assert params.paths.raw == "data/raw-v2"


@pytest.mark.parametrize("value", ["corpus", "."])
def test_lmline_run_with_a_destructive_path_fails_before_any_work(make_params, workspace, value):
    from typer.testing import CliRunner

    from lmline.cli import app

    make_params(tiny_params())
    write_tiny_corpus(workspace, n_docs=2, n_reviews=2)
    sh(workspace, "git", "init", "-q")
    before = tree_state(workspace)
    result = CliRunner().invoke(app, ["run", "--set", f"paths.raw={value}"])
    assert result.exit_code == 1
    assert "error: params.yaml: paths.raw must" in result.output and f"(got {value!r})" in result.output
    assert tree_state(workspace) == before, "no file changed"


# ---------------------------------------------------------------- temp-then-rename
@pytest.mark.parametrize("target", [".", "", "./", "..", "corpus/..", "CWD"])
def test_atomic_path_refuses_a_target_with_no_name_and_removes_nothing(workspace, target):
    from lmline.io import atomic_path

    write_tiny_corpus(workspace, n_docs=2, n_reviews=2)
    (workspace / ".git").mkdir()
    (workspace / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = tree_state(workspace)
    with pytest.raises(LmlineError, match="refusing to replace"):
        with atomic_path(str(workspace) if target == "CWD" else target):
            raise RuntimeError("the body fails: the old code then removed the temp folder's parent")
    assert tree_state(workspace) == before


def test_atomic_path_refuses_the_filesystem_root():
    from lmline.io import refuse_unsafe_target

    with pytest.raises(LmlineError, match="refusing to replace '/'"):
        refuse_unsafe_target(Path("/"))  # only ever called bare: a regression must not get to remove /


def test_atomic_path_keeps_the_old_target_when_the_body_fails_and_replaces_it_whole_otherwise(workspace):
    from lmline.io import atomic_path

    (workspace / "out" / "sub").mkdir(parents=True)
    (workspace / "out" / "sub" / "a.txt").write_text("old")
    (workspace / "beside.txt").write_text("beside")
    with pytest.raises(RuntimeError):
        with atomic_path("out") as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert tree_state(workspace) == {
        "out/sub/a.txt": b"old",
        "beside.txt": b"beside",
        "mlflow.db": (workspace / "mlflow.db").read_bytes(),
    }
    with pytest.raises(LmlineError, match="nothing was written"):
        with atomic_path("out"):
            pass
    assert (workspace / "out" / "sub" / "a.txt").read_text() == "old"
    with atomic_path("out") as tmp:
        tmp.write_text("new")
    assert (workspace / "out").read_text() == "new"
    assert sorted(p.name for p in workspace.iterdir()) == ["beside.txt", "mlflow.db", "out"], "no temp folder left"


# ---------------------------------------------------------------- snapshots
def test_a_snapshot_commits_tracked_files_and_the_pipeline_state_never_untracked_files(tmp_path):
    from lmline.vcs import snapshot

    repo, origin = tmp_path / "ws", tmp_path / "origin.git"
    repo.mkdir()
    sh(tmp_path, "git", "init", "-q", "--bare", str(origin))
    (repo / "tracked.txt").write_text("v1")
    (repo / "params.yaml").write_text("seed: 1\n")
    (repo / "gone.txt").write_text("deleted later")
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "start")
    sh(repo, "git", "remote", "add", "origin", str(origin))
    (repo / "tracked.txt").write_text("v2")
    (repo / "params.yaml").write_text("seed: 2\n")
    (repo / "gone.txt").unlink()
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "corpus").mkdir()
    (repo / "corpus" / "new.jsonl").write_text('{"text": "raw data meant for DVC"}\n')
    (repo / "corpus" / "new.jsonl.dvc").write_text("outs:\n- md5: abc\n  path: new.jsonl\n")
    (repo / "corpus" / ".gitignore").write_text("/new.jsonl\n")
    (repo / ".env").write_text("TOKEN=secret\n")
    status = sh(repo, "git", "status", "--porcelain")

    commit = snapshot(repo, "refs/lmline/test/stage")
    files = set(sh(origin, "git", "ls-tree", "-r", "--name-only", commit).splitlines())
    assert files == {"tracked.txt", "params.yaml", "dvc.lock", "corpus/new.jsonl.dvc", "corpus/.gitignore"}
    assert sh(origin, "git", "show", f"{commit}:tracked.txt") == "v2"
    assert sh(origin, "git", "show", f"{commit}:params.yaml") == "seed: 2"
    assert sh(repo, "git", "status", "--porcelain") == status, "the index and branch are left alone"


# ---------------------------------------------------------------- data add: all or nothing
def test_data_add_undoes_everything_when_a_step_fails_and_a_rerun_ends_as_one_clean_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmline.cli import app
    from tasks import ingest

    repo = make_dvc_repo(tmp_path / "ws", tiny_params())
    origin = tmp_path / "origin.git"
    sh(repo, "git", "remote", "add", "origin", str(origin))  # not created yet: the snapshot's push fails
    (repo / ".env").write_text("TOKEN=secret\n")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    reviews = repo / "corpus" / "reviews.jsonl"
    old = reviews.read_bytes()
    new = tmp_path / "more.jsonl"
    rows = '{"review": "A brilliant new film.", "verdict": "fresh"}\n{"review": "Dull.", "verdict": "rotten"}\n'
    new.write_bytes(b"\xef\xbb\xbf" + rows.encode())  # a BOM, as some editors write
    before = tree_state(repo)
    runner = CliRunner()

    failed = runner.invoke(app, ["data", "add", str(new), "--source", "reviews"])
    assert failed.exit_code == 1 and "git push" in failed.stderr
    assert tree_state(repo) == before, "source file, .dvc file, .gitignore and git index as they were"

    sh(tmp_path, "git", "init", "-q", "--bare", str(origin))
    done = runner.invoke(app, ["data", "add", str(new), "--source", "reviews"])
    assert done.exit_code == 0, done.output
    added = json.loads(done.stdout)
    assert reviews.read_bytes() == old + rows.encode(), "appended once, without the BOM"
    source = config.load(repo / "params.yaml").ingest.sources[1]
    docs, _ = ingest.read_source(source.model_copy(update={"path": str(reviews)}))
    assert len(docs) == old.count(b"\n") + 2 and docs[-1].text == "Dull."
    pointer = yaml.safe_load((repo / "corpus" / "reviews.jsonl.dvc").read_text())["outs"][0]
    assert pointer["md5"] == added["md5"] == hashlib.md5(reviews.read_bytes()).hexdigest()
    tree = sh(origin, "git", "ls-tree", "-r", "--name-only", added["revision"]).splitlines()
    assert "corpus/reviews.jsonl.dvc" in tree and ".env" not in tree and "corpus/reviews.jsonl" not in tree

    again = runner.invoke(app, ["data", "add", str(new), "--source", "reviews"])
    assert again.exit_code == 0 and json.loads(again.stdout)["changed"] is False
    assert reviews.read_bytes() == old + rows.encode(), "re-adding the same rows adds nothing"

    def tree_of(revision: str) -> str:  # the commits differ in their time only
        return sh(origin, "git", "rev-parse", f"{revision}^{{tree}}")

    assert tree_of(json.loads(again.stdout)["revision"]) == tree_of(added["revision"])


def test_data_add_checks_exactly_the_rows_it_appends_as_ingest_reads_them(tmp_path):
    from lmline.data import Rollback, append_rows
    from lmline.sources import CsvSource, JsonlSource
    from tasks import ingest

    def append(new, source):
        with Rollback(tmp_path) as rollback:
            return append_rows(tmp_path, new, source, rollback)

    (tmp_path / "old.csv").write_bytes(b"\xef\xbb\xbftext,label\nx,1\n")
    (tmp_path / "new.csv").write_bytes(b"\xef\xbb\xbftext,label\ny,0\n")
    csv_source = CsvSource(name="c", type="csv", path=str(tmp_path / "old.csv"), label_field="label")
    append(tmp_path / "new.csv", csv_source)
    assert (tmp_path / "old.csv").read_bytes() == b"\xef\xbb\xbftext,label\nx,1\ny,0\n"
    assert [d.text for d in ingest.read_source(csv_source)[0]] == ["x", "y"]

    (tmp_path / "old.jsonl").write_text('{"t": "a"}\n')
    (tmp_path / "bad.jsonl").write_text('{"t": "b"}\n{"u": "no text"}\n')
    jsonl = JsonlSource(name="j", type="jsonl", path=str(tmp_path / "old.jsonl"), text_field="t")
    with pytest.raises(LmlineError, match=r"bad.jsonl line 2: no value for 't'"):
        append(tmp_path / "bad.jsonl", jsonl)
    assert (tmp_path / "old.jsonl").read_text() == '{"t": "a"}\n'
