"""A run on a scheduler the user started: its workers are other processes, started in another working directory.

Every path a task opens must name the same file there as on the client: relative paths in a config (input, output,
run directory, weights) are the client's, so they must reach the workers made absolute.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time

import dask
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from distributed import Client
from safetensors.torch import save_file

from imgcurate import ImageTextPairDataset
from imgcurate.cli import main


@contextlib.contextmanager
def _dask_cluster(home, env, workers=2, worker_env=None):
    """A ``dask scheduler`` and ``workers`` ``dask worker`` processes started in ``home``; yields the address."""
    address_file = str(home / "scheduler.json")
    common = ["--no-dashboard", "--scheduler-file", address_file]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": home}
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--port", "0", *common], env=env, **quiet)]
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(address_file):
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.2)
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", "worker", "--nworkers", str(workers),
                                       "--nthreads", "1", *common], env=worker_env or env, **quiet))  # fmt: skip
        with Client(scheduler_file=address_file, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
            address = client.scheduler.address
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A ``dask scheduler`` and two ``dask worker`` processes, all started in a folder of their own (so the tests'
    own modules do not import there) with a Hugging Face cache of their own."""
    home = tmp_path_factory.mktemp("elsewhere")
    # the workers' Hugging Face cache is an empty folder of their own
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               HF_HUB_CACHE=str(home / "hub"))  # fmt: skip
    with _dask_cluster(home, env) as address:
        yield address, home


def _weights(path, seed):
    import timm

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(timm.create_model("test_resnet").state_dict(), str(path))


def _config(cluster):
    return {
        "input": "shards",
        "output": "out",
        **({"cluster": cluster} if cluster else {}),
        "steps": [
            {
                "TimmImageEmbedder": {
                    "model_name": "test_resnet",
                    "checkpoint_path": "weights/ckpt.safetensors",
                    "batch_size": 8,
                }
            },  # fmt: skip
            {"ExactDuplicates": {}},
            {"SemanticDeduplicator": {"n_clusters": 4, "eps": 1e-4}},
            {"SampleFilter": {"drop_duplicates": ["exact_duplicate", "is_duplicate"], "drop_errors": False}},
        ],
        "reports": {"duplicates": "dups.html"},
        "export": {"filter_column": "keep"},
    }


def _outputs(folder):
    return {name: (folder / "out" / name).read_bytes() for name in sorted(os.listdir(folder / "out"))}


def test_relative_paths_of_a_config_name_the_clients_files_on_the_workers(sample_dir, tmp_path, scheduler,
                                                                          monkeypatch):  # fmt: skip
    """The workers' folder holds a different checkpoint under the config's relative name: a worker that opened
    the relative path would embed with it (and write the export's parts into its own folder)."""
    address, home = scheduler
    _weights(home / "weights" / "ckpt.safetensors", seed=1)
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    runs = {}
    for name, cluster in [("local", None), ("remote", {"address": address})]:
        project = tmp_path / name
        shutil.copytree(sample_dir, project / "shards")
        _weights(project / "weights" / "ckpt.safetensors", seed=0)
        (project / "p.yaml").write_text(yaml.safe_dump(_config(cluster)))
        monkeypatch.chdir(project)
        assert main(["run", "p.yaml"]) == 0
        runs[name] = project
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before  # nothing written in the workers' folder
    assert _outputs(runs["remote"]) == _outputs(runs["local"])
    emb = {name: ImageTextPairDataset.from_webdataset(str(p / "out")).metadata.compute() for name, p in runs.items()}
    pd.testing.assert_frame_equal(emb["remote"], emb["local"])
    assert len(emb["remote"]) > 0 and "samples flagged ('is_duplicate')" in (runs["remote"] / "dups.html").read_text()


def test_save_metadata_to_a_relative_folder_writes_on_the_clients_side(sample_dir, tmp_path, scheduler, monkeypatch):
    address, home = scheduler
    monkeypatch.chdir(tmp_path)
    with Client(address):
        ds = ImageTextPairDataset.from_webdataset("shards")
        df = ds.metadata
        ds = ds.with_metadata(df.assign(big=df.width >= 256))
        written = ds.save_metadata("meta", columns=["big"])
    assert not (home / "meta").exists()
    assert [os.path.dirname(p) for p in written] == [str(tmp_path / "meta")] * len(ds.tar_files)
    back = pd.concat([pd.read_parquet(p) for p in written], ignore_index=True)
    src = ds.metadata.compute().reset_index(drop=True)
    assert back["key"].tolist() == src["key"].tolist()
    assert np.array_equal(back["big"].to_numpy(), src["big"].to_numpy())


def _pipeline(tmp_path, sample_dir, address, steps):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "input": str(sample_dir), "output": str(tmp_path / "out"), "cluster": {"address": address}, "steps": steps,
    }))  # fmt: skip
    return str(tmp_path / "p.yaml")


def test_a_step_module_the_workers_cannot_import_is_an_error_before_any_work(sample_dir, tmp_path, scheduler, capsys):
    """``user_steps`` imports here (the tests' folder is on this process's path), not in the workers' folder."""
    address, _ = scheduler
    config = _pipeline(tmp_path, sample_dir, address, [{"ExactDuplicates": {}}, {"user_steps:CaptionLength": {}}])
    assert main(["run", config]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "imgcurate: error: cluster: 2 of 2 workers cannot import 'user_steps', which the step CaptionLength needs: "
        "install it where the workers run (or put it on their PYTHONPATH)"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_doctor_runs_the_cluster_checks_on_a_running_scheduler(sample_dir, tmp_path, scheduler, capsys):
    """``imgcurate doctor --config`` with ``cluster: {address: ...}`` checks the workers as ``run`` would, so a
    config that ``run`` refuses there does not pass it; a config the workers can run passes, and no scheduler at the
    address is a failure too."""
    address, _ = scheduler
    config = _pipeline(tmp_path, sample_dir, address, [{"ExactDuplicates": {}}, {"user_steps:CaptionLength": {}}])
    assert main(["doctor", "--config", config]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "would not work: cluster: 2 of 2 workers cannot import 'user_steps', which the step CaptionLength needs: "
        "install it where the workers run (or put it on their PYTHONPATH)"
    )
    assert main(["doctor", "--config", _pipeline(tmp_path, sample_dir, address, [{"ExactDuplicates": {}}])]) == 0
    assert "would not work" not in capsys.readouterr().out
    with socket.socket() as free:  # a port no scheduler listens on
        free.bind(("127.0.0.1", 0))
        nobody = f"tcp://127.0.0.1:{free.getsockname()[1]}"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert main(["doctor", "--config", _pipeline(tmp_path, sample_dir, nobody, [{"ExactDuplicates": {}}])]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"would not work: cluster.address: no Dask scheduler answered at {nobody} within 2s (OSError)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("pretrained", "problem"),
    [(True, "not available offline"),
     # if-available is settled where the run starts: a worker without the weights would embed with random ones
     ("if-available", "are not here, though they were in the cache where the run started")],
)  # fmt: skip
def test_weights_cached_here_but_not_on_the_workers_are_an_error_before_any_work(sample_dir, tmp_path, scheduler,
                                                                                 monkeypatch, capsys, pretrained,
                                                                                 problem):  # fmt: skip
    """Offline, pretrained weights must be in every worker's cache: here they are in this process's only."""
    import huggingface_hub.constants as hc
    import timm

    address, _ = scheduler
    repo = timm.create_model("test_resnet").pretrained_cfg["hf_hub_id"]
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    _weights(folder / "snapshots" / commit / "model.safetensors", seed=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    embedder = {"model_name": "test_resnet", "pretrained": pretrained}
    config = _pipeline(tmp_path, sample_dir, address, [{"TimmImageEmbedder": embedder}])
    assert main(["run", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("imgcurate: error: cluster: on 2 of 2 workers: pretrained weights for 'test_resnet' ")
    assert problem in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_memory_paths_are_refused_while_tasks_run_in_worker_processes(sample_ds, scheduler):
    """``memory://`` is private to a process: with a client of worker processes, a call that would hand such a path
    to tasks says so at once instead of failing (or writing nowhere) mid-job; with threads it works."""
    from imgcurate.rundir import RunDir

    address, _ = scheduler
    calls = {
        "memory://x-export": lambda: sample_ds.to_webdataset("memory://x-export"),
        "memory://x-meta": lambda: sample_ds.save_metadata("memory://x-meta"),
        "memory://x-input": lambda: ImageTextPairDataset.from_webdataset("memory://x-input"),
        "memory://x-run": lambda: RunDir("memory://x-run"),
    }
    with Client(address):
        for path, call in calls.items():
            with pytest.raises(ValueError, match=f"^{path}: this process's memory, which the worker processes"):
                call()
    out = sample_ds.to_webdataset("memory://x-export", old_id_col="old_key")  # the threaded scheduler: one process
    assert out.metadata.compute()["old_key"].tolist() == sample_ds.metadata.compute()["key"].tolist()


def test_a_module_of_a_classifier_inside_an_embedder_is_checked_on_the_workers(sample_dir, tmp_path, scheduler,
                                                                               capsys):  # fmt: skip
    address, _ = scheduler
    head = {"user_steps:SumHead": {"embedding_size": 96}}
    embedder = {"model_name": "test_resnet", "batch_size": 8, "classifiers": [head]}
    config = _pipeline(tmp_path, sample_dir, address, [{"TimmImageEmbedder": embedder}])
    assert main(["run", config]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "imgcurate: error: cluster: 2 of 2 workers cannot import 'user_steps', which the step TimmImageEmbedder "
        "needs: install it where the workers run (or put it on their PYTHONPATH)"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_workers_running_another_imgcurate_are_an_error_before_any_work(sample_dir, tmp_path, scheduler, monkeypatch,
                                                                        capsys):  # fmt: skip
    """The workers' imgcurate is compared with this process's by version and by its source files (here this process
    says it runs another version)."""
    import imgcurate.pipeline as pipeline

    address, _ = scheduler
    workers = pipeline.code_identity()
    monkeypatch.setattr(pipeline, "code_identity", lambda: ("0.0.1", workers[1]))
    config = _pipeline(tmp_path, sample_dir, address, [{"ExactDuplicates": {}}])
    assert main(["run", config]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"imgcurate: error: cluster: 2 of 2 workers run another imgcurate (version {workers[0]}) than this process "
        "(version 0.0.1): install the same one where the workers run, so that every shard is computed by the same code"
    )
    monkeypatch.setattr(pipeline, "code_identity", lambda: (workers[0], "another checkout"))
    assert main(["run", config]) == 2
    assert "2 of 2 workers run another imgcurate (the same version from other source files)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_client_made_before_the_run_is_checked_as_a_cluster_given_by_address(sample_dir, tmp_path, scheduler):
    from imgcurate.errors import ClusterError
    from imgcurate.pipeline import Pipeline

    address, _ = scheduler
    config = {"input": str(sample_dir), "output": str(tmp_path / "out"), "steps": [{"user_steps:CaptionLength": {}}]}
    with Client(address) as client:
        with pytest.raises(ClusterError, match="2 of 2 workers cannot import 'user_steps'"):
            Pipeline.from_config(config).run()
        assert client.status == "running"  # the caller's client is left as it was
    assert not (tmp_path / "out").exists()


def test_a_step_module_the_scheduler_cannot_import_is_an_error_before_any_work(sample_dir, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    """The scheduler unpickles the task graph, so it needs the steps' modules too: here the worker has the user's
    module on its path and the scheduler does not."""
    mods, home = tmp_path / "mods", tmp_path / "elsewhere"
    mods.mkdir()
    home.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "user_steps.py"), mods / "only_on_workers.py")
    monkeypatch.syspath_prepend(str(mods))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    with _dask_cluster(home, env, workers=1, worker_env=dict(env, PYTHONPATH=str(mods))) as address:
        config = _pipeline(tmp_path, sample_dir, address, [{"only_on_workers:CaptionLength": {}}])
        assert main(["run", config]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "imgcurate: error: cluster: the scheduler cannot import 'only_on_workers', which the step CaptionLength "
            "needs (it unpickles the task graph): install it where the scheduler runs (or put it on its PYTHONPATH)"
        )
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()
