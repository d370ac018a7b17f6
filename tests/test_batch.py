"""`python -m ldm batch` in local mode on the tiny fixture checkpoint: jobs and --grid, images against the
txt2img/img2img commands' own, batching that does not change an image, the manifest and resuming (after
a SIGKILL too), failed jobs. The Ray runs are in tests/test_batch_ray.py."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from ldm import batch, generate
from ldm.batch.grid import expand, parse_grid, write_jobs
from ldm.batch.jobs import parse_job, read_jobs
from ldm.batch.manifest import Manifest
from ldm.batch.ray_run import resources
from ldm.errors import UsageError
from ldm.images import read_parameters, read_settings

ROOT = Path(__file__).resolve().parents[1]
CKPT = str(FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors")
CONFIG = str(FIXTURES["sd1_tiny"] / "sd1_tiny.yaml")
INIT = str(FIXTURES["sd1_tiny"] / "txt2img.png")
TINY = {"ckpt": CKPT, "config": CONFIG, "H": 32, "W": 32, "ddim_steps": 4, "device": "cpu", "precision": "full"}
# what the commands need to run the same model the same way
FLAGS = ["--ckpt", CKPT, "--config", CONFIG, "--ddim_steps", "4", "--device", "cpu", "--precision", "full",
         "--seed-mode", "per-sample", "--n_iter", "1", "--skip_grid"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def run_batch(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = batch.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def manifest_lines(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def png_bytes(outdir: Path) -> dict[str, bytes]:
    """{path relative to outdir: bytes} of every image (hidden folders left out)."""
    return {str(p.relative_to(outdir)): p.read_bytes() for p in sorted(outdir.glob("[!.]*/*.png"))}


def twelve_jobs() -> list[dict]:
    """Mixed settings: two scales, two samplers (one stochastic), a two-image job, img2img."""
    jobs = [{"id": f"t{n}", "prompt": p, "seed": s, "scale": sc, **TINY}
            for n, (p, s, sc) in enumerate([(p, s, sc) for p in ("a red circle", "a blue square")
                                            for s in (3, 11) for sc in (5.0, 7.5)])]
    jobs += [{"id": "euler", "prompt": "a green triangle", "seed": 5, "sampler": "euler_a", **TINY},
             {"id": "pair", "prompt": "two of them", "seed": 20, "n_samples": 2, **TINY}]
    img = {k: v for k, v in TINY.items() if k not in ("H", "W")}
    jobs += [{"id": f"img{s}", "prompt": "a painting", "init_img": INIT, "strength": 0.6, "seed": s, **img}
             for s in (1, 2)]
    return jobs


# ---- the jobs file and --grid ---------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_of_its_values(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat, sitting\na dog\n\n")
    grid = parse_grid(f"prompts=@{prompts},seeds=3-5,scale=5|7.5,sampler=ddim,H=32")
    assert grid == {"prompt": ["a cat, sitting", "a dog"], "seed": [3, 4, 5], "scale": [5, 7.5],
                    "sampler": ["ddim"], "H": [32]}
    jobs = expand(grid)
    assert len(jobs) == 2 * 3 * 2
    assert [j["id"] for j in jobs] == [f"{n:05d}" for n in range(12)]
    assert jobs[0] == {"id": "00000", "prompt": "a cat, sitting", "seed": 3, "scale": 5, "sampler": "ddim", "H": 32}
    assert jobs[1]["scale"] == 7.5 and jobs[2]["seed"] == 4 and jobs[6]["prompt"] == "a dog"  # last key fastest
    assert {(j["prompt"], j["seed"], j["scale"]) for j in jobs} == {
        (p, s, c) for p in ("a cat, sitting", "a dog") for s in (3, 4, 5) for c in (5, 7.5)}
    # a comma inside a prompt stays in it unless key= follows
    assert parse_grid("prompts=red, round|blue,seeds=1")["prompt"] == ["red, round", "blue"]
    for bad, says in [("prompts", "is not key=values"), ("seeds=5-2", "range is empty"),
                      ("seed=1,seeds=2", "given twice"), ("id=a|b", "ids are given by the grid")]:
        with pytest.raises(UsageError, match=says):
            parse_grid(bad)


def test_grid_writes_the_jobs_file_once_and_resumes_from_it(tmp_path, capsys):
    jobs_file = tmp_path / "jobs.jsonl"
    spec = f"prompts=a red circle|a blue square,seeds=0-1,ckpt={CKPT},config={CONFIG},H=32,W=32,ddim_steps=2,device=cpu"
    code, out, _ = run_batch(capsys, jobs_file, "--grid", spec)
    assert code == 0 and "wrote 4 job(s)" in out
    jobs = read_jobs(jobs_file)
    assert [j["id"] for j in jobs] == ["00000", "00001", "00002", "00003"]
    assert jobs[3]["prompt"] == "a blue square" and jobs[3]["seed"] == 1 and jobs[3]["ckpt"] == CKPT
    assert run_batch(capsys, jobs_file, "--grid", spec)[1].startswith("kept 4 job(s)")  # the same grid again
    code, _, err = run_batch(capsys, jobs_file, "--grid", spec.replace("0-1", "0-2"))
    assert code == 2 and "holds other jobs" in err and len(read_jobs(jobs_file)) == 4  # never overwritten
    assert not write_jobs(jobs_file, expand(parse_grid(spec)))


def test_a_jobs_keys_are_the_commands_flags(tmp_path):
    command, args = parse_job({"id": "a", "prompt": "-starts with a dash", "negative_prompt": "blurry", "seed": 7,
                               "sampler": "Euler a", "ddim_steps": 3, "scale": 5, "H": 64, "W": 32, "plms": False})
    assert command == "txt2img"
    assert (args.prompt, args.negative_prompt, args.seed, args.sampler, args.ddim_steps, args.scale, args.H, args.W) \
        == ("-starts with a dash", "blurry", 7, "Euler a", 3, 5.0, 64, 32)
    assert (args.n_samples, args.n_iter, args.seed_mode, args.plms) == (1, 1, "per-sample", False)
    command, args = parse_job({"id": "b", "init_img": "x.png", "strength": 0.3, "n_samples": 2})
    assert (command, args.init_img, args.strength, args.n_samples) == ("img2img", "x.png", 0.3, 2)
    for job, says in [({"colour": "red"}, "unknown key 'colour'"), ({"seed": "x"}, "invalid int value"),
                      ({"outdir": "elsewhere"}, "outdir is the batch's"), ({"n_iter": 2}, "more images with n_samples"),
                      ({"plms": "yes"}, "is not true or false"), ({"from_file": "p.txt"}, "one job per prompt")]:
        with pytest.raises(UsageError, match=says):
            parse_job({"id": "c", **job})


def test_the_jobs_file_must_identify_every_job(tmp_path):
    for lines, says in [(['{"prompt": "x"}'], 'needs an "id"'), (['{"id": "../up"}'], 'needs an "id"'),
                        (['{"id": 1}', '{"id": "1"}'], "used twice"), (['{"id": "a"', ], "not JSON"),
                        (["[1, 2]"], "a job is a JSON object"), ([""], "has no jobs")]:
        path = tmp_path / "jobs.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(UsageError, match=says):
            read_jobs(path)
    with pytest.raises(UsageError, match="no such file"):
        read_jobs(tmp_path / "missing.jsonl")
    path = write(tmp_path / "rel.jsonl", [{"id": 5, "ckpt": "model.ckpt", "init_img": "in.png"}, {"id": "b", "ckpt": "builtin"}])
    first, second = read_jobs(path)
    assert first["id"] == "5" and first["ckpt"] == os.path.abspath("model.ckpt")  # workers may run elsewhere
    assert first["init_img"] == os.path.abspath("in.png") and second["ckpt"] == "builtin"


# ---- the images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["txt2img", "img2img", "a1111"])
def test_a_job_makes_the_commands_images(tmp_path, capsys, command):
    """With batches of the job's own size, a job's PNGs hold the pixels and the `parameters` text that the
    command itself writes with --seed-mode per-sample (image i seeded seed + i); a1111: weighted prompts."""
    if command == "img2img":
        job, flags = {"prompt": "a painting", "init_img": INIT, "strength": 0.5, "seed": 9, "scale": 5.0}, \
            ["--init-img", INIT, "--strength", "0.5"]
    else:
        job, flags = {"prompt": "a red circle", "seed": 9, "scale": 5.0, "H": 32, "W": 32}, ["--H", "32", "--W", "32"]
    if command == "a1111":
        command, job["prompt"], job["prompt_syntax"] = "txt2img", "a (red:1.4) circle, [blue]", "a1111"
        flags += ["--prompt-syntax", "a1111"]
    job.update(id="j", n_samples=2, **{k: v for k, v in TINY.items() if k not in ("H", "W")})
    code, _, err = run_batch(capsys, write(tmp_path / "jobs.jsonl", [job]), "--outdir", tmp_path / "out",
                             "--batch-size", 2)
    assert code == 0, err
    assert generate.main(command, FLAGS + flags + ["--prompt", job["prompt"], "--seed", "9", "--scale", "5",
                                                   "--n_samples", "2", "--outdir", str(tmp_path / "cmd")]) == 0
    for i in range(2):
        ours, theirs = tmp_path / "out" / "j" / f"{i:05d}.png", tmp_path / "cmd" / "samples" / f"{i:05d}.png"
        np.testing.assert_array_equal(np.array(Image.open(ours)), np.array(Image.open(theirs)))
        assert read_parameters(ours) == read_parameters(theirs)
        settings = read_settings(ours)
        assert {k: settings.pop(k) for k in ("job", "batch_rows", "threads")} == {"job": "j", "batch_rows": 2, "threads": 1}
        assert settings == read_settings(theirs)
    assert not np.array_equal(np.array(Image.open(tmp_path / "out" / "j" / "00000.png")),
                              np.array(Image.open(tmp_path / "out" / "j" / "00001.png")))


def test_an_image_does_not_depend_on_the_jobs_it_ran_with(tmp_path, capsys):
    """The twelve jobs in one run (batched together, padded to 4) and each job in a run of its own."""
    jobs = twelve_jobs()
    assert run_batch(capsys, write(tmp_path / "all.jsonl", jobs), "--outdir", tmp_path / "all")[0] == 0
    together = png_bytes(tmp_path / "all")
    assert len(together) == 13  # "pair" made two
    for job in jobs[::-1][:4]:  # img2img, two images, a stochastic sampler: each alone
        out = tmp_path / f"alone-{job['id']}"
        assert run_batch(capsys, write(tmp_path / f"{job['id']}.jsonl", [job]), "--outdir", out)[0] == 0
        alone = png_bytes(out)
        assert alone and all(together[name] == data for name, data in alone.items()), job["id"]


# ---- the manifest, resuming ---------------------------------------------------------------------------

def test_the_manifest_records_each_job_and_a_rerun_skips_them(tmp_path, capsys):
    jobs = twelve_jobs()[:3]
    jobs_file, out = write(tmp_path / "jobs.jsonl", jobs), tmp_path / "out"
    code, stdout, err = run_batch(capsys, jobs_file, "--outdir", out)
    assert code == 0, err
    assert "3 job(s) run (0 failed), 0 skipped" in stdout and "images/minute" in stdout and "worker" in stdout
    lines = manifest_lines(out)
    assert sorted(r["id"] for r in lines) == ["t0", "t1", "t2"]
    for r in lines:
        assert r["files"] == [f"{r['id']}/00000.png"] and r["images"] == 1 and r["seconds"] > 0 and r["worker"]
        assert r["sha256"] == [hashlib.sha256((out / f).read_bytes()).hexdigest() for f in r["files"]]
    stamps = {f: os.stat(out / f).st_mtime_ns for f in png_bytes(out)}
    code, stdout, _ = run_batch(capsys, jobs_file, "--outdir", out)
    assert code == 0 and "0 job(s) run (0 failed), 3 skipped" in stdout and len(manifest_lines(out)) == 3
    write(jobs_file, jobs + [twelve_jobs()[5]])  # one more job: only it runs
    code, stdout, _ = run_batch(capsys, jobs_file, "--outdir", out)
    assert code == 0 and "1 job(s) run (0 failed), 3 skipped" in stdout
    ids = [r["id"] for r in manifest_lines(out)]
    assert sorted(ids[:3]) == ["t0", "t1", "t2"] and ids[3:] == ["t5"]
    assert all(os.stat(out / f).st_mtime_ns == t for f, t in stamps.items())


def test_a_torn_manifest_line_and_an_unrecorded_folder(tmp_path, capsys):
    """What a kill can leave: half a manifest line (cut off, its job runs again), a job's folder landed but
    not recorded (recorded from its files, not made again), a hidden landing folder (removed)."""
    jobs_file, out = write(tmp_path / "jobs.jsonl", twelve_jobs()[:3]), tmp_path / "out"
    assert run_batch(capsys, jobs_file, "--outdir", out)[0] == 0
    full = png_bytes(out)
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    by_id = {json.loads(line)["id"]: line for line in lines}
    stamp = os.stat(out / "t1" / "00000.png").st_mtime_ns
    # t1: landed, never recorded; t2: its line torn and its folder gone (the kill came mid-append)
    import shutil
    shutil.rmtree(out / "t2")
    (out / "manifest.jsonl").write_text(by_id["t0"] + by_id["t2"][:25])
    (out / ".landing-t2-0000").mkdir()
    (out / ".landing-t2-0000" / "00000.png").write_bytes(b"\x89PNG half")
    code, stdout, _ = run_batch(capsys, jobs_file, "--outdir", out)
    assert code == 0 and "1 job(s) run" in stdout
    records = manifest_lines(out)
    assert [r["id"] for r in records] == ["t0", "t1", "t2"]
    assert records[1]["recovered"] is True and records[1]["sha256"] == json.loads(by_id["t1"])["sha256"]
    assert os.stat(out / "t1" / "00000.png").st_mtime_ns == stamp
    assert png_bytes(out) == full and not list(out.glob(".landing-*"))


def test_sigkill_of_the_driver_then_resume(tmp_path, capsys):
    """Kill -9 the driver after a few jobs have landed; the rerun finishes the rest: every job exactly once,
    every file whole and the same as an uninterrupted run's, nothing that had landed made again."""
    jobs = [{"id": f"k{n:02d}", "prompt": f"shape {n}", "seed": n, **TINY, "ddim_steps": 8} for n in range(10)]
    jobs_file, out = write(tmp_path / "jobs.jsonl", jobs), tmp_path / "out"
    argv = [sys.executable, "-m", "ldm", "batch", str(jobs_file), "--outdir", str(out), "--batch-size", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            path = out / "manifest.jsonl"
            if path.exists() and path.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = manifest_lines(out)
    landed = {r["id"] for r in before}
    assert 3 <= len(landed) < len(jobs)
    stamps = {f: os.stat(out / f).st_ino for r in before for f in r["files"]}
    for png in out.glob("[!.]*/*.png"):  # whatever the kill left under an image's name is a whole PNG
        Image.open(png).verify()

    code, stdout, err = run_batch(capsys, jobs_file, "--outdir", out, "--batch-size", 1)
    assert code == 0, err
    after = manifest_lines(out)
    # a folder landed in the instant between its rename and its manifest line is recorded, not made again
    recovered = sum(bool(r.get("recovered")) for r in after)
    done = len(landed) + recovered
    assert f"{len(jobs) - done} job(s) run (0 failed), {done} skipped" in stdout
    assert sorted(r["id"] for r in after) == [j["id"] for j in jobs]  # each exactly once
    assert after[:len(before)] == before
    assert all(os.stat(out / f).st_ino == ino for f, ino in stamps.items())  # not written again
    assert not list(out.glob(".*")) and sorted(p.name for p in out.iterdir()) == sorted(landed | {
        j["id"] for j in jobs} | {"manifest.jsonl"})
    for r in after:
        assert r["sha256"] == [hashlib.sha256((out / f).read_bytes()).hexdigest() for f in r["files"]]
    assert run_batch(capsys, jobs_file, "--outdir", tmp_path / "clean", "--batch-size", 1)[0] == 0
    assert png_bytes(tmp_path / "clean") == png_bytes(out)


# ---- failures ---------------------------------------------------------------------------------------

def test_failed_jobs_are_recorded_and_the_others_go_on(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_bytes(b"not a checkpoint at all")
    good = twelve_jobs()[:2]
    jobs = [good[0],
            {**TINY, "id": "missing", "ckpt": str(tmp_path / "nowhere.ckpt")},
            {**TINY, "id": "badsize", "H": 33},
            {**TINY, "id": "typo", "promt": "a cat"},
            {**TINY, "id": "junk", "ckpt": str(not_a_checkpoint), "config": None},
            good[1]]
    jobs_file, out = write(tmp_path / "jobs.jsonl", jobs), tmp_path / "out"
    code, stdout, err = run_batch(capsys, jobs_file, "--outdir", out)
    assert code == 1 and "4 of 6 job(s) failed" in err and "6 job(s) run (4 failed)" in stdout
    records = {r["id"]: r for r in manifest_lines(out)}
    assert set(records) == {j["id"] for j in jobs}
    assert records["missing"]["error"].startswith(f"{tmp_path / 'nowhere.ckpt'}: no such file; download")
    assert records["badsize"]["error"].startswith("--H 33 is not a multiple of 2")
    assert records["typo"]["error"].startswith("unknown key 'promt'")
    assert str(not_a_checkpoint) in records["junk"]["error"]
    assert all("\n" not in r["error"] and "files" not in r for i, r in records.items() if i not in ("t0", "t1"))
    assert sorted(png_bytes(out)) == ["t0/00000.png", "t1/00000.png"]
    # a rerun skips failed jobs too; --retry-failed runs them again (and they fail again)
    assert "0 job(s) run" in run_batch(capsys, jobs_file, "--outdir", out)[1]
    code, stdout, _ = run_batch(capsys, jobs_file, "--outdir", out, "--retry-failed")
    assert code == 1 and "4 job(s) run (4 failed), 2 skipped" in stdout


def test_bad_batch_flags_are_one_line(tmp_path, capsys):
    jobs_file = write(tmp_path / "jobs.jsonl", twelve_jobs()[:1])
    for argv, says in [([jobs_file], "--outdir DIR is required"),
                       ([jobs_file, "--outdir", tmp_path / "o", "--batch-size", 0], "--batch-size 0"),
                       ([jobs_file, "--outdir", tmp_path / "o", "--workers", 2], "are for --ray"),
                       ([jobs_file, "--outdir", jobs_file], "is a file"),
                       ([tmp_path / "none.jsonl", "--outdir", tmp_path / "o"], "no such file")]:
        code, _, err = run_batch(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and says in err, err


def test_ray_is_needed_only_for_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    jobs_file = write(tmp_path / "jobs.jsonl", twelve_jobs()[:1])
    code, _, err = run_batch(capsys, jobs_file, "--outdir", tmp_path / "o", "--ray")
    assert code == 2 and "pip install -e '.[ray]'" in err
    assert run_batch(capsys, jobs_file, "--outdir", tmp_path / "o")[0] == 0  # local mode never imports it


def test_actors_leave_a_cpu_to_ray_data():
    # two workers on two cores: half a CPU each, one CPU left for Ray Data's own tasks; one torch thread each
    assert resources(2, 2, None, None) == (0.5, 1)
    assert resources(2, 1, None, None) == (1.0, 1)
    assert resources(64, 8, None, 4) == (7.88, 4)
    assert resources(1, 2, None, None) == (0.1, 1)
    assert resources(8, 2, 3, None) == (3, 1)
    with pytest.raises(UsageError, match="--workers 0"):
        resources(2, 0, None, None)


def test_a_worker_running_other_code_than_the_driver_fails_its_jobs():
    """A Ray actor (here its class, called directly) whose ldm code is not the driver's makes no images:
    they would differ without an error (another version on a node, a file edited mid-run)."""
    import pickle

    from ldm.batch.ray_run import Worker
    from ldm.batch.version import code_digest

    batch_of = {"job": np.array([json.dumps(job) for job in twelve_jobs()[:2]], dtype=object)}
    results = [pickle.loads(r) for r in Worker(4, 1, "0" * 16)(batch_of)["result"]]
    assert [r["id"] for r in results] == ["t0", "t1"]
    assert all("runs other ldm code than the driver" in r["error"] and "files" not in r for r in results)
    results = [pickle.loads(r) for r in Worker(4, 1, code_digest())(batch_of)["result"]]
    assert [(r["id"], len(r["files"])) for r in results] == [("t0", 1), ("t1", 1)]
