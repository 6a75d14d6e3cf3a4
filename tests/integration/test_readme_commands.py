"""The README's commands, run as a user types them: from a fresh working directory, with nothing but the
environment the README documents.

Every command of the README's ```bash blocks is either run (RUN, after the substitutions below, which
swap real-weights experiments and downloaded datasets for the demo's tiny encoder and synthetic data) or
skipped on purpose with a reason (SKIPPED). A command the README gains is in neither table and fails this
test until it is handled; an entry whose command left the README fails it too.

Every train/eval/predict command, run or not, is also composed as written, with each job of a sweep
expanded, and checked like a run checks its config (``check_config`` and the settings that are cheap
to build), so the forms that are too slow to run here still cannot refer to a missing option.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from anomret.config import config_dir

from .cli import unexpected_lines

README = Path(__file__).resolve().parents[2] / "README.md"

# Applied to every command that runs, in this order: (README text, replacement, why).
SUBSTITUTIONS = [
    ("+experiment=mrad_tf_mvtec", "+experiment=demo", "real CLIP weights and MVTec/VisA -> the demo"),
    ("+experiment=mrad_tf_visa", "+experiment=demo", "real CLIP weights and MVTec/VisA -> the demo"),
    ("dataset=mpdd", "dataset=synthetic_b", "MPDD is not downloaded; the other synthetic domain"),
    ("dataset.categories=[bottle,screw]", "dataset.categories=[weave,pill]", "categories of the demo data"),
    ("trainer=gpu", "trainer=cpu", "no GPU"),
    ("input=/images/line3", "input=images/line3", "images the test writes into the working directory"),
    ("logs/mrad_tf_mvtec/", "logs/demo/", "the demo experiment's task_name"),
]

SWEEP = "python -m anomret.train -m +experiment=mrad_tf_mvtec model.score.retrieval_weight=0.5,0.7,1.0 model.score.top_k_ratio=0.001,0.01"
REPORT_SWEEP = "python -m anomret.train -m +experiment=mrad_tf_mvtec model.score.retrieval_weight=0.5,0.7,1.0 model.score.top_k_ratio=0.005,0.01"

# Commands run, in README order, with substitutions of their own (a sweep of two jobs keeps it short).
RUN: dict[str, list[tuple[str, str]]] = {
    "python -m anomret.prepare mvtec data/mvtec_anomaly_detection": [],
    "python -m anomret.prepare --list": [],
    "python -m anomret.prepare folder data/mine": [],
    "python -m anomret.train +experiment=demo dataset=folder dataset.root=data/mine dataset.require_masks=false": [],
    "python -m anomret.train +experiment=demo_rad dataset=folder dataset.root=data/mine dataset.require_masks=false": [],
    "python -m anomret.train +experiment=mrad_tf_mvtec": [],
    "python -m anomret.eval +experiment=mrad_tf_mvtec dataset=mpdd memory.path=.cache/banks/<bank>.safetensors": [],
    "python -m anomret.predict +experiment=mrad_tf_mvtec memory.path=.cache/banks/<bank>.safetensors input=/images/line3": [],
    "python -m anomret.train +experiment=mrad_tf_mvtec dataset.categories=[bottle,screw] data.batch_size=16 trainer=gpu": [],
    SWEEP: [
        ("model.score.retrieval_weight=0.5,0.7,1.0", "model.score.retrieval_weight=0.5,0.7"),
        ("model.score.top_k_ratio=0.001,0.01", "model.score.top_k_ratio=0.01"),
    ],
    "python -m anomret.report logs/mrad_tf_mvtec/train-multirun/<time>": [],
    "python -m anomret.report logs/mrad_tf_mvtec/train-multirun/<time> --per-category": [],
    "python -m anomret.report logs/a/train/<t1> logs/b/train/<t2> --out reports/a_vs_b": [
        ("logs/a/train/<t1>", "logs/demo/train/<t1>"),
        ("logs/b/train/<t2>", "logs/demo/train/<t2>"),
    ],
}

_SAME_SWEEP = "the same form as the sweep that runs (train -m over model values); it composes (checked)"
SKIPPED: dict[str, str] = {
    "make demo": "python -m anomret.train +experiment=demo inside the .venv it builds; the demo form runs",
    "make test": "runs this test suite",
    "python -m anomret.train +experiment=mrad_tf_mvtec dataset=folder dataset.root=data/mine": (
        "real CLIP weights; the same run with the demo's encoder runs (the CPU form of the recipe)"
    ),
    "python -m anomret.train +experiment=mrad_tf_visa": "the same command as mrad_tf_mvtec once substituted",
    "python -m anomret.train -m +experiment=mrad_tf_mvtec memory.max_patch_entries=100,500,1000 memory.seed=0,1,2": _SAME_SWEEP,
    "python -m anomret.train -m +experiment=mrad_tf_mvtec aux_dataset=visa,mvtec encoder.vv_blocks=[2,24],[6,24]": _SAME_SWEEP,
    REPORT_SWEEP: _SAME_SWEEP,
    "python -m anomret.train -m +experiment=mrad_tf_mvtec logger=wandb model.score.retrieval_weight=0.5,0.7": (
        "W&B logging: tests/integration/test_train_eval.py (offline runs read back); composes (checked)"
    ),
    "python -m anomret.train -m +experiment=mrad_tf_mvtec logger=wandb model.score.retrieval_weight=0.5,0.7,1.0": (
        "W&B logging: tests/integration/test_train_eval.py; composes (checked)"
    ),
    "WANDB_MODE=offline python -m anomret.train -m +experiment=mrad_tf_mvtec logger=wandb model.score.top_k_ratio=0.005,0.01": (
        "W&B logging: tests/integration/test_train_eval.py; composes (checked)"
    ),
    "wandb sync logs/mrad_tf_mvtec/train-multirun/<time>/*/wandb/offline-run-*": "uploads to a W&B server",
    "python -m anomret.train -m +experiment=demo trainer=ddp_cpu model.score.retrieval_weight=0.5,1.0": (
        "two DDP jobs take minutes on 2 cores: tests/integration/test_ddp.py runs multirun + DDP"
    ),
    "python -m anomret.train -m hydra/launcher=slurm_gpu hydra.launcher.partition=gpu hydra.launcher.timeout_min=120 trainer=gpu +experiment=mrad_tf_mvtec dataset=mvtec,btad,mpdd": (
        "needs a SLURM cluster: tests/integration/test_launchers.py composes it"
    ),
    "python -m anomret.train -m hydra/launcher=submitit_local +experiment=demo model.score.retrieval_weight=0.5,1.0": (
        "launcher plugin: tests/integration/test_launchers.py"
    ),
    "python -m anomret.train +experiment=mrad_tf_mvtec +hparams_search=mrad_tf_optuna": (
        "20 Optuna trials with real weights; composes (checked)"
    ),
    "python -m anomret.train +experiment=demo +hparams_search=demo_optuna": (
        "three trials: tests/integration/test_launchers.py runs the Optuna sweeper"
    ),
    "python -m anomret.train +experiment=demo_rad": "tests/integration/test_rad_runs.py runs the RAD demo command",
    "python -m anomret.train +experiment=demo_rad_fewshot": (
        "tests/integration/test_rad_runs.py runs the few-shot demo; composes (checked)"
    ),
    "python -m anomret.train +experiment=rad_mvtec trainer=gpu": "real DINOv3 weights and MVTec; composes (checked)",
    "python -m anomret.eval +experiment=rad_mvtec memory.path=BANK": (
        "the eval form runs above; RAD banks through eval: tests/integration/test_rad_runs.py"
    ),
    "python -m anomret.predict +experiment=rad_mvtec memory.path=BANK input=some/images/": (
        "the predict form runs above; composes (checked)"
    ),
    "python -m anomret.train +experiment=demo_rad encoder=clip_vit_b16 encoder.pretrained=null": (
        "a ViT-B/16 with random weights takes minutes on 2 cores; composes (checked)"
    ),
    "python -m anomret.train +experiment=demo_rad encoder=dinov2_vitb14 encoder.pretrained=null": (
        "a ViT-B/14 with random weights takes minutes on 2 cores; composes (checked)"
    ),
    "python -m anomret.train +experiment=demo_mrad_tf encoder=dinov3_vitb16 encoder.pretrained=null": (
        "a ViT-B/16 with random weights takes minutes on 2 cores; composes (checked)"
    ),
    "python -m anomret.train +experiment=mrad_ft_mvtec": "real CLIP weights and VisA; composes (checked)",
    "python -m anomret.train +experiment=mrad_ft_visa": "real CLIP weights and MVTec; composes (checked)",
    "python -m anomret.train +experiment=mrad_clip_mvtec": "real CLIP weights and VisA; composes (checked)",
    "python -m anomret.train +experiment=mrad_clip_visa": "real CLIP weights and MVTec; composes (checked)",
    "python -m anomret.train +experiment=demo_mrad_ft": (
        "tests/integration/test_mrad_trained.py runs the demo train and eval commands"
    ),
    "python -m anomret.train +experiment=demo_mrad_clip": (
        "tests/integration/test_mrad_trained.py trains the CLIP demo and reloads its checkpoint"
    ),
    "python -m anomret.eval +experiment=mrad_clip_visa ckpt_path=logs/mrad_clip_visa/train/<time>/checkpoints/last.ckpt": (
        "checkpoint reload through eval: tests/integration/test_mrad_trained.py; composes (checked)"
    ),
    "python -m anomret.eval +experiment=mrad_clip_mvtec ckpt_path=.../last.ckpt dataset=mpdd": (
        "checkpoint reload through eval: tests/integration/test_mrad_trained.py; composes (checked)"
    ),
    "python -m anomret.eval -m +experiment=mrad_clip_mvtec ckpt_path=.../last.ckpt dataset=mvtec,visa,btad,mpdd,sdd,ksdd2,dagm,dtd,headct,brainmri,br35h,isic,clinicdb,colondb,kvasir,endo": (
        "16 real datasets; every job composes (checked)"
    ),
    "python -m anomret.predict +experiment=mrad_clip_mvtec ckpt_path=.../last.ckpt input=/images/line3": (
        "the predict form runs above; composes (checked)"
    ),
    "python -m anomret.train +experiment=mrad_clip_mvtec model.official_checkpoint=/path/mrad_clip_final.pth": (
        "official checkpoint files: tests/integration/test_mrad_trained.py; composes (checked)"
    ),
    "python -m anomret.eval +experiment=mrad_ft_mvtec model.official_checkpoint=/path/mrad_ft_final.pth memory.path=BANK": (
        "official checkpoint files: tests/integration/test_mrad_trained.py; composes (checked)"
    ),
    "python -m anomret.analysis.similarity +experiment=mrad_ft_mvtec ckpt_path=.../last.ckpt": (
        "tests/integration/test_mrad_trained.py runs the analysis on a trained checkpoint"
    ),
    "python -m anomret.analysis.similarity -m +experiment=mrad_ft_mvtec ckpt_path=.../last.ckpt dataset=mvtec,btad,mpdd,isic": (
        "real datasets; the analysis runs in tests/integration/test_mrad_trained.py"
    ),
    "python -m anomret.train +experiment=demo calibration=normal_holdout": (
        "tests/integration/test_package_service.py runs it before exporting; composes (checked)"
    ),
    "python -m anomret.eval +experiment=demo memory.path=BANK calibration=normal_folder calibration.folder=/images/line3/good": (
        "folder calibration refusing test images: tests/integration/test_calibrated_runs.py (the fpr pass runs with normal_holdout); composes (checked)"
    ),
    "python -m anomret.eval +experiment=demo memory.path=BANK calibration=labelled calibration.dataset.root=data/validation": (
        "a validation dataset: tests/integration/test_calibrated_runs.py; composes (checked)"
    ),
    "python -m anomret.export logs/demo/train/<time> packages/demo": (
        "tests/integration/test_package_service.py exports a calibrated demo run"
    ),
    "python -m anomret.predict package=packages/demo input=/images/line3": (
        "tests/integration/test_package_service.py predicts with a package"
    ),
    "python -m anomret.serve packages/demo --port 8000": (
        "tests/integration/test_package_service.py serves a package on a free loopback port"
    ),
    "curl -F image=@part.png http://127.0.0.1:8000/predict": (
        "tests/integration/test_package_service.py posts images over real HTTP"
    ),
}


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, one per line (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def _jobs(overrides: list[str]) -> list[list[str]]:
    """Every job of a sweep, as the overrides of a single run."""
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def _check_composes(command: str) -> int:
    """Compose every job of a train/eval/predict command as written and check it like a run; job count."""
    from anomret.assembly import build
    from anomret.contracts import Purpose, check_config
    from anomret.memory.base import MemorySettings

    words = shlex.split(command)
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # environment prefixes
    if words[:2] != ["python", "-m"] or words[2] not in ("anomret.train", "anomret.eval", "anomret.predict"):
        return 0
    if any(word.startswith("package=") for word in words):
        return 0  # the model comes from the package (tests/integration/test_package_service.py)
    config_name = {"anomret.train": "config", "anomret.eval": "eval", "anomret.predict": "predict"}[words[2]]
    purpose = {"config": Purpose.TRAIN, "eval": Purpose.EVAL, "predict": Purpose.PREDICT}[config_name]
    overrides = [w for w in words[3:] if w != "-m" and not w.startswith("hydra/launcher")]
    overrides = [w for w in overrides if not w.startswith("hydra.launcher.")]
    overrides = [re.sub(r"<(\w+)>", r"\1", w) for w in overrides]  # placeholders such as <bank>, <time>
    jobs = _jobs(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name, overrides=job)
            check_config(cfg, purpose)
            settings = build(cfg.memory)
            assert isinstance(settings, MemorySettings)
            build(cfg.retrieval)
    GlobalHydra.instance().clear()
    return len(jobs)


def test_every_readme_command_is_handled():
    commands = readme_commands(README.read_text())
    unhandled = [c for c in commands if c not in RUN and c not in SKIPPED]
    assert not unhandled, (
        "README commands this test neither runs nor skips; add each to RUN (with substitutions) or to "
        "SKIPPED (with the reason):\n" + "\n".join(unhandled)
    )
    stale = [c for c in [*RUN, *SKIPPED] if c not in commands]
    assert not stale, "entries whose command is no longer in the README:\n" + "\n".join(stale)


def test_every_readme_run_command_composes_with_each_sweep_job():
    composed = sum(_check_composes(command) for command in readme_commands(README.read_text()))
    assert composed >= 20  # the sweeps expand to their jobs


def _own_images(synthetic: Path, root: Path) -> None:
    """A folder in MVTec layout with category names no benchmark has."""
    shutil.copytree(synthetic / "synthetic_a" / "pill", root / "widget")
    shutil.copytree(synthetic / "synthetic_a" / "wood", root / "gear")


def _mvtec_download(root: Path) -> None:
    """An MVTec AD folder as extracted (two categories of tiny images)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from data.fake_trees import build_tree

    tree = build_tree("mvtec", root.parent)
    tree.root.rename(root)


def _resolve(command: str, cwd: Path) -> str:
    """Fill the README's placeholders from what the earlier commands wrote, as a user would."""
    if "<bank>" in command:
        runs = sorted((cwd / "logs").glob("*/train/*/artifacts.json"), key=lambda p: p.stat().st_mtime)
        bank = Path(json.loads(runs[-1].read_text())["bank"])
        command = command.replace(".cache/banks/<bank>.safetensors", str(bank))
    if "<time>" in command:
        sweeps = sorted((cwd / "logs" / "demo" / "train-multirun").iterdir())
        command = command.replace("<time>", sweeps[-1].name)
    if "<t1>" in command:
        runs = sorted((cwd / "logs" / "demo" / "train").iterdir())
        command = command.replace("<t1>", runs[0].name).replace("<t2>", runs[-1].name)
    return command


def test_readme_commands_run_from_a_fresh_directory(tmp_path):
    # Only what the README documents: offline weights and W&B (and the interpreter with this code).
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    data = tmp_path / "data"
    from anomret.data.synthetic import ensure_synthetic

    synthetic = tmp_path / "synthetic_source"
    ensure_synthetic(synthetic)
    _mvtec_download(data / "mvtec_anomaly_detection")
    _own_images(synthetic, data / "mine")
    images = tmp_path / "images" / "line3"
    shutil.copytree(synthetic / "synthetic_a" / "pill" / "test" / "spot", images)

    ran: dict[str, str] = {}
    for command in readme_commands(README.read_text()):
        if command not in RUN:
            continue
        resolved = command
        for old, new, _ in SUBSTITUTIONS:
            resolved = resolved.replace(old, new)
        for old, new in RUN[command]:
            resolved = resolved.replace(old, new)
        resolved = _resolve(resolved, tmp_path)
        words = shlex.split(resolved)
        assert words[:2] == ["python", "-m"], command
        result = subprocess.run(
            [sys.executable, *words[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (
            f"{command}\n(ran: {resolved})\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
        )
        ran[command] = result.stdout + result.stderr
        assert not unexpected_lines(ran[command]), (command, unexpected_lines(ran[command]))

    assert set(ran) == set(RUN)
    assert (data / "mvtec_anomaly_detection" / "meta.json").is_file() and (
        data / "mine" / "meta.json"
    ).is_file()
    mine = sorted((tmp_path / "logs" / "demo" / "train").glob("*/results.json"))
    assert any(set(json.loads(p.read_text())["categories"]) == {"widget", "gear"} for p in mine)
    sweep = sorted((tmp_path / "logs" / "demo" / "train-multirun").iterdir())[-1]
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "1"]
    assert (sweep / "report.csv").is_file() and (tmp_path / "reports" / "a_vs_b" / "report.csv").is_file()
    predictions = sorted((tmp_path / "logs" / "demo" / "predict").glob("*/predictions.csv"))
    assert predictions and len(predictions[-1].read_text().splitlines()) == 1 + len(list(images.iterdir()))
