"""A finished run shared through a DVC remote (docs/sharing.md): `dvc push` here, `dvc pull` in a colleague's
fresh clone, and nothing is left to run there.

One tiny run (configs/tiny.yaml, the default DAG through `dvc repro`) is pushed to a shared folder and, where
the dev extras are installed (dvc-s3, moto[server]), to an S3 bucket served by moto on 127.0.0.1 with IAM
authentication on. Fresh `git clone`s pull it back (`dvc pull --with-deps dvc.yaml`): `dvc status --with-deps
dvc.yaml` has nothing to report, `dvc repro` runs no stage, the outputs are byte-identical and `cpal-compare`
shows the same numbers. A remote that cannot be reached or refuses the credentials fails `dvc push` / `dvc pull`
with DVC's own message and leaves the workspace as it was (no output changed, none half-written, the locks
untouched).

Remotes are configured as a user would, with `--local` (.dvc/config.local, git-ignored by .dvc/.gitignore):
nothing about them, secrets least of all, lands in a committed file. Tests never touch the network: S3 runs
against loopback only, with the EC2 metadata lookup and the user's ~/.aws files switched off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_workspace import copy_workspace, dvc_repro_plan, engine_env, run_in

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
BUCKET = "cpal-team"
# The default pipeline, what `dvc repro` runs: dvc.yaml's stages and those of hosts/dvc.yaml they need (the
# classifier's maps through the CRF). `dvc pull` and `dvc status` without a target also take in the IRN and AMN
# stages of hosts/dvc.yaml: where they never ran, status lists them and pull exits 1 for their outputs (no hash
# in any dvc.lock), whatever the remote holds (test_plain_pull_stops_at_branches_not_run).
PIPELINE = ["--with-deps", "dvc.yaml"]
LOCKS = ["dvc.lock", "hosts/dvc.lock"]  # where the default pipeline's stages record their outputs

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Finished:
    ws: Path  # the workspace that ran the pipeline and pushed it
    remote: Path  # the shared folder it pushed to (the default remote, named "team")
    outputs: dict[str, str]  # every tracked output file -> sha256, as the run wrote it


@dataclass(frozen=True)
class Moto:
    url: str
    key_id: str
    secret: str


def _run(cwd: Path, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command that may fail: its result, not an assertion."""
    return subprocess.run(cmd, cwd=cwd, env=env or engine_env(), capture_output=True, text=True)


def _ok(cwd: Path, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = _run(cwd, cmd, env)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lock_outs(ws: Path) -> list[str]:
    """Every output the locks record (metrics and plots included: DVC lists them all under outs)."""
    stages = [stage for lock in LOCKS for stage in yaml.safe_load((ws / lock).read_text())["stages"].values()]
    return sorted(out["path"] for stage in stages for out in stage.get("outs") or [])


def _output_files(ws: Path, outs: list[str]) -> dict[str, str]:
    """Each file of each output (folders expanded) -> sha256; missing outputs are simply absent."""
    files = {}
    for out in outs:
        path = ws / out
        for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            files[str(f.relative_to(ws))] = _sha(f)
    return files


def _tree(ws: Path) -> dict[str, str]:
    """Every file of the workspace -> sha256, except git's and DVC's own bookkeeping (.git, .dvc/tmp, the cache)."""
    skip = (ws / ".git", ws / ".dvc" / "tmp", ws / ".dvc" / "cache")
    return {str(p.relative_to(ws)): _sha(p) for p in sorted(ws.rglob("*"))
            if p.is_file() and not any(p.is_relative_to(s) for s in skip)}


def _clone(finished: Finished, dest: Path) -> Path:
    """A colleague's fresh clone: git only, no DVC cache, no outputs, no remote configured yet."""
    _ok(dest.parent, ["git", "clone", "-q", str(finished.ws), str(dest)])
    assert not (dest / "outputs").exists() and not (dest / ".dvc" / "cache").exists()
    return dest


def _status(ws: Path, env: dict[str, str] | None = None) -> dict:
    return json.loads(_ok(ws, [*DVC, "status", "--json", *PIPELINE], env).stdout or "{}")


def _assert_nothing_to_do(clone: Path, finished: Finished, env: dict[str, str] | None = None) -> None:
    assert _status(clone, env) == {}
    assert "Data and pipelines are up to date." in _ok(clone, [*DVC, "status", *PIPELINE], env).stdout
    assert _output_files(clone, _lock_outs(clone)) == finished.outputs  # everything, byte for byte
    res = _ok(clone, [*DVC, "repro"], env)
    assert "Running stage" not in res.stdout, res.stdout[-3000:]


def _dvc_error(res: subprocess.CompletedProcess, *expected: str) -> str:
    """A failed DVC command: nonzero exit, DVC's `ERROR:` line naming the cause."""
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "ERROR:" in out, out[-3000:]
    assert any(e in out for e in expected), out[-3000:]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, dvc_pair: dict) -> Finished:
    """The tiny default pipeline run once (the session's `dvc repro`, tests/conftest.py, copied), its locks
    committed, pushed to a shared folder."""
    base = tmp_path_factory.mktemp("team")
    ws = copy_workspace(dvc_pair["first"], base / "ws")
    run_in(ws, ["git", "add", *LOCKS])
    run_in(ws, ["git", "commit", "-qm", "finished run"])
    remote = base / "shared" / "cpal-dvc"  # what `dvc remote add -d --local team /shared/cpal-dvc` points at
    run_in(ws, [*DVC, "remote", "add", "-d", "--local", "team", str(remote)])
    run_in(ws, [*DVC, "push"])  # pushes every output that has a hash; the branches' are skipped
    assert _status(ws) == {}
    outputs = _output_files(ws, _lock_outs(ws))
    assert "outputs/seg/model.pt" in outputs and "results/eval_seg.json" in outputs
    return Finished(ws, remote, outputs)


@pytest.fixture(scope="module")
def pulled(finished: Finished, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone with the same shared folder configured (--local) and `dvc pull` run."""
    clone = _clone(finished, tmp_path_factory.mktemp("colleague") / "clone")
    _ok(clone, [*DVC, "remote", "add", "-d", "--local", "team", str(finished.remote)])
    _ok(clone, [*DVC, "pull", *PIPELINE])
    return clone


# ----------------------------------------------------------------------------------------------
# S3 on loopback (moto, IAM authentication on)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _s3_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The engines' environment with no AWS settings of the user's: no ~/.aws files, no EC2 metadata lookup
    (it would reach for 169.254.169.254), no AWS_* variables but the ones given."""
    env = {k: v for k, v in engine_env().items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-creds"),
               AWS_EC2_METADATA_DISABLED="true", **extra)
    return env


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """An S3 server on 127.0.0.1 that checks credentials: one IAM user allowed s3:*, one bucket."""
    pytest.importorskip("dvc_s3", reason="S3 remotes need dvc-s3 (pip install -e '.[dev]')")
    pytest.importorskip("moto.server", reason="the loopback S3 server needs moto[server] (pip install -e '.[dev]')")
    import boto3

    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # the first 4 requests (the setup below) go unauthenticated; every later one must carry valid credentials
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        setup = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="colleague")
        key = iam.create_access_key(UserName="colleague")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="colleague", PolicyName="team-bucket", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        yield Moto(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def _add_s3_remote(ws: Path, name: str, endpoint: str, env: dict[str, str], default: bool = False) -> None:
    _ok(ws, [*DVC, "remote", "add", *(["-d"] if default else []), "--local", name, f"s3://{BUCKET}/cpal"], env)
    _ok(ws, [*DVC, "remote", "modify", "--local", name, "endpointurl", endpoint], env)


# ----------------------------------------------------------------------------------------------
# The round trip


def test_remote_settings_stay_out_of_git(finished: Finished) -> None:
    """`dvc remote add --local` writes .dvc/config.local, which .dvc/.gitignore keeps out of every commit."""
    assert "/config.local" in (ROOT / ".dvc" / ".gitignore").read_text().split()
    assert "remote" not in (ROOT / ".dvc" / "config").read_text()  # the repository names no remote of its own
    ws = finished.ws
    assert str(finished.remote) in (ws / ".dvc" / "config.local").read_text()
    assert "remote" not in (ws / ".dvc" / "config").read_text()
    _ok(ws, ["git", "check-ignore", "-q", ".dvc/config.local"])
    assert _ok(ws, ["git", "status", "--porcelain"]).stdout == ""  # the run, pushed: nothing to commit


def test_fresh_clone_pulls_the_finished_run(finished: Finished, pulled: Path) -> None:
    """Every output comes back byte for byte, `dvc status` is clean and `dvc repro` runs nothing."""
    _assert_nothing_to_do(pulled, finished)


def test_compare_shows_the_pulled_numbers(finished: Finished, pulled: Path, tmp_path: Path) -> None:
    """`cpal-compare` in the clone: the same table rows, the same numbers, as where the run happened."""
    tables = {}
    for name, ws in (("origin", finished.ws), ("clone", pulled)):
        _ok(ws, [sys.executable, "-m", "cpal.report.compare", "--out", str(tmp_path / name / "experiments")])
        tables[name] = pd.read_csv(tmp_path / name / "experiments.csv").set_index("state")
    metrics = ["seeds_cam", "seeds_pacam", "crf", "pseudo", "deeplab", "upper_bound"]
    for state in ("baseline", "workspace"):  # the committed run (its dvc.lock vouches) and the working copy
        origin, clone = tables["origin"].loc[state, metrics], tables["clone"].loc[state, metrics]
        assert origin.notna().all(), (state, origin.to_dict())
        assert clone.to_dict() == origin.to_dict(), state


def test_s3_round_trip_with_per_user_credentials(finished: Finished, moto: Moto, tmp_path: Path) -> None:
    """Push with keys set by `dvc remote modify --local`, pull in a fresh clone with keys from the environment."""
    env = _s3_env(tmp_path)
    ws = finished.ws
    _add_s3_remote(ws, "s3team", moto.url, env)
    try:
        _ok(ws, [*DVC, "remote", "modify", "--local", "s3team", "access_key_id", moto.key_id], env)
        _ok(ws, [*DVC, "remote", "modify", "--local", "s3team", "secret_access_key", moto.secret], env)
        assert moto.secret in (ws / ".dvc" / "config.local").read_text()
        assert _ok(ws, ["git", "status", "--porcelain"]).stdout == ""  # the secret stays out of git
        assert "pushed" in _ok(ws, [*DVC, "push", "-r", "s3team"], env).stdout
    finally:
        _ok(ws, [*DVC, "remote", "remove", "--local", "s3team"], env)

    clone = _clone(finished, tmp_path / "clone")
    _add_s3_remote(clone, "team", moto.url, env, default=True)
    keys = _s3_env(tmp_path, AWS_ACCESS_KEY_ID=moto.key_id, AWS_SECRET_ACCESS_KEY=moto.secret)
    _ok(clone, [*DVC, "pull", *PIPELINE], keys)
    assert moto.secret not in (clone / ".dvc" / "config.local").read_text()
    _assert_nothing_to_do(clone, finished, keys)


# ----------------------------------------------------------------------------------------------
# Remotes that fail: DVC's message, nothing in the workspace changed


def _unreachable(kind: str, base: Path, request: pytest.FixtureRequest) -> tuple[list[list[str]], dict, tuple]:
    """(`dvc remote` commands that set remote "bad" up, the environment, what DVC's error says) for each way a
    remote can fail."""
    base.mkdir(parents=True, exist_ok=True)
    if kind == "folder_missing":  # a mount that is not there (pull only: push would create the folder)
        return [["bad", str(base / "not-mounted" / "cpal-dvc")]], engine_env(), (
            "do not exist neither locally nor on remote",)
    if kind == "folder_unwritable":  # a path that cannot be a folder (a file in the way)
        (base / "a-file").write_text("not a folder\n")
        return [["bad", str(base / "a-file" / "cpal-dvc")]], engine_env(), ("Not a directory",)
    pytest.importorskip("dvc_s3", reason="S3 remotes need dvc-s3 (pip install -e '.[dev]')")
    if kind == "s3_closed_port":  # nothing listens: botocore retries (about 15 s by default; once here)
        url = f"http://127.0.0.1:{_free_port()}"
        env = _s3_env(base, AWS_MAX_ATTEMPTS="1", AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")
        return [["bad", f"s3://{BUCKET}/cpal"], ["endpointurl", url]], env, ("Could not connect to the endpoint URL",)
    moto = request.getfixturevalue("moto")
    setup = [["bad", f"s3://{BUCKET}/cpal"], ["endpointurl", moto.url]]
    if kind == "s3_wrong_secret":  # the server answers 403
        keys = {"AWS_ACCESS_KEY_ID": moto.key_id, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        return setup, _s3_env(base, **keys), ("Forbidden",)
    return setup, _s3_env(base), ("Unable to locate credentials",)  # s3_no_credentials: boto gives up first


def _configure(ws: Path, setup: list[list[str]], env: dict, default: bool) -> None:
    name, url = setup[0]
    _ok(ws, [*DVC, "remote", "add", *(["-d"] if default else []), "--local", name, url], env)
    for key, value in setup[1:]:
        _ok(ws, [*DVC, "remote", "modify", "--local", name, key, value], env)


# Unreachable and refusing, each once per direction (the suite's time budget); the other kinds below stay
# available to run by hand: folder_unwritable for push, s3_closed_port and s3_no_credentials for pull.
@pytest.mark.parametrize("kind", ["s3_closed_port", "s3_wrong_secret"])
def test_failed_push_changes_nothing(finished: Finished, kind: str, tmp_path: Path,
                                     request: pytest.FixtureRequest) -> None:
    ws = finished.ws
    setup, env, expected = _unreachable(kind, tmp_path, request)
    _configure(ws, setup, env, default=False)
    try:
        before, locks = _tree(ws), [(ws / lock).read_bytes() for lock in LOCKS]
        _dvc_error(_run(ws, [*DVC, "push", "-r", "bad"], env), *expected)
        assert _tree(ws) == before  # no output, no dvc.lock, no stray file changed
        assert [(ws / lock).read_bytes() for lock in LOCKS] == locks
        assert _status(ws) == {}
    finally:
        _ok(ws, [*DVC, "remote", "remove", "--local", "bad"], env)


@pytest.mark.parametrize("kind", ["folder_missing", "s3_wrong_secret"])
def test_failed_pull_leaves_the_clone_without_outputs(finished: Finished, kind: str, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    clone = _clone(finished, tmp_path / "clone")
    setup, env, expected = _unreachable(kind, tmp_path / "remote", request)
    _configure(clone, setup, env, default=True)
    before = _tree(clone)
    _dvc_error(_run(clone, [*DVC, "pull", *PIPELINE], env), *expected)
    assert _tree(clone) == before  # no output, whole or partial, and the locks as committed
    assert set(_status(clone)) == set(dvc_repro_plan(clone))  # all to run


def test_pull_from_an_incomplete_remote_checks_out_only_whole_outputs(finished: Finished, tmp_path: Path) -> None:
    """A remote missing one object (a push cut short): `dvc pull` fails naming it; every output it did
    restore is whole and byte-identical, the one it could not is absent (not half-written)."""
    remote = tmp_path / "incomplete"
    shutil.copytree(finished.remote, remote)
    lock = yaml.safe_load((finished.ws / "dvc.lock").read_text())
    model = next(o for o in lock["stages"]["train_seg@seg"]["outs"] if o["path"] == "outputs/seg/model.pt")
    (remote / "files" / "md5" / model["md5"][:2] / model["md5"][2:]).unlink()
    clone = _clone(finished, tmp_path / "clone")
    _ok(clone, [*DVC, "remote", "add", "-d", "--local", "team", str(remote)])
    out = _dvc_error(_run(clone, [*DVC, "pull", *PIPELINE]), "failed to pull data")
    assert model["md5"] in out  # DVC names the missing object
    pulled = _output_files(clone, _lock_outs(clone))
    assert "outputs/seg/model.pt" not in pulled
    assert pulled == {k: v for k, v in finished.outputs.items() if k != "outputs/seg/model.pt"}
    assert set(_status(clone)) == {"train_seg@seg", "eval_seg@seg", "report"}  # only what needs the model reruns


def test_plain_pull_stops_at_branches_not_run(finished: Finished, tmp_path: Path) -> None:
    """`dvc pull` without a target restores the whole default pipeline, then exits 1 over the IRN/AMN branch
    outputs no dvc.lock has a hash for (DVC's checkout refuses them; `dvc push` only skips them). Hence
    `dvc pull --with-deps dvc.yaml` in docs/sharing.md; this keeps that advice honest if DVC changes."""
    clone = _clone(finished, tmp_path / "clone")
    _ok(clone, [*DVC, "remote", "add", "-d", "--local", "team", str(finished.remote)])
    out = _dvc_error(_run(clone, [*DVC, "pull"]), "Checkout failed for following targets")
    assert "No file hash info found" in out and "outputs/irn/model.pt" in out
    _assert_nothing_to_do(clone, finished)
