"""benchmarks/gpu_check.py at toy sizes on the CPU, end to end, so the GPU check does not rot between GPU runs.

It runs as users run it, in a process of its own with its own Ray cluster: `serve run` deploys a whole Serve config,
which would replace the session service that other tests share on the session's cluster.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "checkpoints_written_s",
    "preprocess_job_rows_per_s",
    "dino_images_per_s",
    "prompt_cache_prompts_per_s",
    "train_samples_per_s",
    "train_peak_memory_gib",
    "train_wall_s",
    "export_bytes",
    "export_load_s",
    "serve_ready_s",
    "serve_stage_s",
    "serve_peak_memory_gib",
}
DEPLOYMENTS = ("GatewayDeployment", "PromptEncoderDeployment", "AlignerDeployment", "DecoderDeployment")


def test_the_check_runs_every_job_on_the_cpu_and_prints_its_figures_then_an_ok_verdict(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a cluster of its own
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `serve` CLI of this Python
    command = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--workdir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    # Ray's raylet may print a warning on stdout too: the check's own lines are the JSON ones.
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stderr[-3000:]
    assert lines[-1] == {"verdict": "ok", "failed_step": None}
    figures = lines[:-1]
    assert {line["figure"] for line in figures} == FIGURES
    scalars = [line["value"] for line in figures if not isinstance(line["value"], dict)]
    assert all(value > 0 for value in scalars)
    stages = {line["route"]: line["value"] for line in figures if line["figure"] == "serve_stage_s"}
    assert set(stages) == {"/v1/generate", "/v1/jobs"}
    assert all(set(seconds) == {"prompt_encoder", "aligner", "decoder"} for seconds in stages.values())
    replicas = " ".join(line["replica"] for line in figures if line["figure"] == "serve_peak_memory_gib")
    assert all(f"#{name}#" in replicas for name in DEPLOYMENTS)
    train = next(line for line in figures if line["figure"] == "train_samples_per_s")
    assert (train["zero_stage"], train["precision"]) == (2, "fp32")
