"""`python -m ldm batch --ray` on a local Ray instance (2 CPUs here) with the tiny fixture checkpoint: the
same PNG bytes as local mode with one worker and with two, a worker killed mid-run replaced and its jobs
run again; `slow`: 200 jobs, 2 workers against local mode (images per minute printed, not asserted).
Each run starts and stops its own Ray instance, as the command does."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from test_batch import TINY, manifest_lines, png_bytes, run_batch, twelve_jobs, write  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RAY = ["--ray", "--object-store-mb", "200"]


def test_local_and_ray_with_one_and_two_workers_give_the_same_bytes(tmp_path, capsys):
    jobs_file = write(tmp_path / "jobs.jsonl", twelve_jobs())
    runs = {"local": [], "ray1": [*RAY, "--workers", "1"], "ray2": [*RAY, "--workers", "2"]}
    images, workers = {}, {}
    for name, flags in runs.items():
        code, stdout, err = run_batch(capsys, jobs_file, "--outdir", tmp_path / name, *flags)
        assert code == 0, err
        assert "12 job(s) run (0 failed)" in stdout and "images/minute" in stdout
        images[name] = png_bytes(tmp_path / name)
        records = manifest_lines(tmp_path / name)
        assert sorted(r["id"] for r in records) == sorted(j["id"] for j in twelve_jobs())
        workers[name] = {r["worker"] for r in records}
    assert len(images["local"]) == 13
    assert images["ray1"] == images["local"] and images["ray2"] == images["local"]
    assert len(workers["ray1"]) == 1 and workers["ray1"] != workers["local"]  # made by the actor, not here
    assert not ray.is_initialized()  # the command shut its instance down


def test_a_killed_worker_is_replaced_and_its_jobs_run_again(tmp_path, capsys):
    jobs = [{"id": f"w{n:02d}", "prompt": f"shape {n}", "seed": n, **TINY} for n in range(24)]
    jobs_file = write(tmp_path / "jobs.jsonl", jobs)
    out, killed = tmp_path / "ray", []

    def kill_the_first_worker():  # SIGKILL the actor that made the first job to land, while the run goes on
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            path = out / "manifest.jsonl"
            if path.exists() and path.read_text():
                worker = json.loads(path.read_text().splitlines()[0])["worker"]
                os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
                killed.append((worker, path.read_text().count("\n")))
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_the_first_worker)
    watcher.start()
    code, stdout, err = run_batch(capsys, jobs_file, "--outdir", out, *RAY, "--workers", "2", "--batch-size", "2")
    watcher.join()
    records = manifest_lines(out)
    assert code == 0, (err[-2000:], [r.get("error") for r in records])
    assert killed and killed[0][1] < len(jobs), "the worker was killed after the run had finished"
    assert sorted(r["id"] for r in records) == [j["id"] for j in jobs]  # each exactly once
    # the killed actor, the other one, and the killed one's replacement (a new process), which ran the jobs
    # the killed one held
    assert len({r["worker"] for r in records}) >= 3, (killed, [(r["id"], r["worker"]) for r in records])
    assert run_batch(capsys, jobs_file, "--outdir", tmp_path / "local", "--batch-size", "2")[0] == 0
    assert png_bytes(out) == png_bytes(tmp_path / "local")


@pytest.mark.slow
def test_two_hundred_jobs_two_workers_against_local_mode(tmp_path, capsys):
    """Throughput on this machine, printed (run with -s); the assertions are only that both made the same
    200 images."""
    spec = ",".join([f"prompts={'|'.join(f'a shape number {n}' for n in range(10))}", "seeds=0-19",
                     *(f"{k}={v}" for k, v in {**TINY, "ddim_steps": 10}.items())])
    jobs_file = tmp_path / "jobs.jsonl"
    assert run_batch(capsys, jobs_file, "--grid", spec)[0] == 0
    report = {}
    for name, flags in {"local, 1 thread": [], "ray, 2 workers x 1 thread": [*RAY, "--workers", "2"]}.items():
        began = time.perf_counter()
        code, stdout, err = run_batch(capsys, jobs_file, "--outdir", tmp_path / name, *flags)
        assert code == 0, err
        report[name] = (time.perf_counter() - began, stdout)
        assert len(png_bytes(tmp_path / name)) == 200
    assert png_bytes(tmp_path / "ray, 2 workers x 1 thread") == png_bytes(tmp_path / "local, 1 thread")
    with capsys.disabled():
        for name, (seconds, stdout) in report.items():
            print(f"\n{name}: {seconds:.1f} s wall for the command, {60 * 200 / seconds:.1f} images/minute\n{stdout}")
