"""Load the official MRAD checkpoints (``mrad_ft_*.pth``, ``mrad_clip_*.pth``) into this package's modules.

The official files are ``torch.save``-d dicts of state dicts:

| section | official inner keys | here |
|---|---|---|
| ``patch_proj`` | ``fc.0.{weight,bias}`` (queries), ``fc.1.*`` (keys) | ``MRADProjectionHeads.patch.{query,key}`` |
| ``image_proj`` | ``mlp1.*`` (queries), ``mlp2.*`` (keys) | ``MRADProjectionHeads.image.{query,key}`` |
| ``prompt_proj`` | ``mlp1.*`` (normal), ``mlp2.*`` (anomalous) | ``MRADPromptLearner.prompt_bias.{normal,anomalous}`` |
| ``prompt_learner`` | ``ctx_pos`` / ``ctx_neg`` ``[1, 1, n, W]``, ``compound_prompts_text.N`` ``[4, W]`` | ``ctx_normal`` / ``ctx_anomalous`` ``[n, W]``, ``deep_prompts.N`` |

Also in ``prompt_learner``, and not loaded: the vestigial ``mlp.*`` and ``compound_prompt_projections.*``
(never called by the official code), and the buffers derived from the frozen text tower
(``token_prefix_*``, ``token_suffix_*``, ``tokenized_prompts_*``). The token ids are compared with the
learner's own, so a checkpoint trained with other prompt text is refused rather than loaded into the
wrong slots. Files are read with ``weights_only=True`` (no unpickling of arbitrary objects); nothing is
copied unless every entry maps.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from anomret.models.projections import MRADProjectionHeads
from anomret.models.prompts import MRADPromptLearner

log = logging.getLogger(__name__)

SECTIONS = ("patch_proj", "image_proj", "prompt_learner", "prompt_proj")
_VESTIGIAL = ("mlp.", "compound_prompt_projections.")
_DERIVED = ("token_prefix_pos", "token_prefix_neg", "token_suffix_pos", "token_suffix_neg")
_TOKEN_IDS = {"tokenized_prompts_pos": 0, "tokenized_prompts_neg": 1}


class OfficialCheckpointError(ValueError):
    """The checkpoint does not fit the given modules; the message lists every offending entry."""


@dataclass
class OfficialCheckpointLoad:
    """What a load did: ``mapped`` official key → module key, ``ignored`` key → why, ``skipped`` sections."""

    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _linear_pairs(official: tuple[str, str], ours: tuple[str, str]) -> dict[str, str]:
    return {f"{o}.{p}": f"{t}.{p}" for o, t in zip(official, ours, strict=True) for p in ("weight", "bias")}


def _section_targets(section: str, heads: MRADProjectionHeads | None, prompts: MRADPromptLearner | None):
    """``(module, prefix, official key → module key)`` for a section, or ``None`` when no module is given."""
    if section in ("patch_proj", "image_proj"):
        if heads is None:
            return None
        if section == "patch_proj":
            return heads, "heads.", _linear_pairs(("fc.0", "fc.1"), ("patch.query", "patch.key"))
        return heads, "heads.", _linear_pairs(("mlp1", "mlp2"), ("image.query", "image.key"))
    if prompts is None:
        return None
    if section == "prompt_proj":
        return (
            prompts,
            "prompts.",
            _linear_pairs(("mlp1", "mlp2"), ("prompt_bias.normal", "prompt_bias.anomalous")),
        )
    names = {"ctx_pos": "ctx_normal", "ctx_neg": "ctx_anomalous"}
    names.update(
        {f"compound_prompts_text.{i}": f"deep_prompts.{i}" for i in range(len(prompts.deep_prompts))}
    )
    return prompts, "prompts.", names


def map_official_checkpoint(
    checkpoint: Mapping[str, Mapping[str, Tensor]],
    *,
    heads: MRADProjectionHeads | None = None,
    prompts: MRADPromptLearner | None = None,
) -> OfficialCheckpointLoad:
    """Copy an official checkpoint's tensors into ``heads`` / ``prompts``; all or nothing.

    Sections for which no module is given are skipped (e.g. evaluating an MRAD-CLIP checkpoint as
    MRAD-FT); every module given must be filled completely.

    Raises:
        OfficialCheckpointError: listing unknown sections/keys, shape mismatches, parameters the
            checkpoint lacks, and prompt token ids that differ from the learner's.
    """
    if heads is None and prompts is None:
        raise ValueError(
            "give the modules to load into: heads=MRADProjectionHeads and/or prompts=MRADPromptLearner"
        )
    report = OfficialCheckpointLoad()
    problems: list[str] = []
    copies: list[tuple[Tensor, Tensor]] = []
    unknown_sections = sorted(set(checkpoint) - set(SECTIONS))
    if unknown_sections:
        problems.append(f"unknown sections {unknown_sections} (expected some of {list(SECTIONS)})")

    for module, needed in (
        (heads, ("patch_proj", "image_proj")),
        (prompts, ("prompt_learner", "prompt_proj")),
    ):
        if module is None:
            continue
        for section in needed:
            if section == "prompt_proj" and prompts is not None and prompts.prompt_bias is None:
                if section in checkpoint:
                    problems.append(
                        "prompt_proj: the checkpoint has prompt-bias maps but this learner has none "
                        f"(bias_source={prompts.bias_source!r}); use model.prompts.bias_source=dual"
                    )
                continue
            if section not in checkpoint:
                hint = " (an MRAD-FT checkpoint has no prompts)" if section.startswith("prompt") else ""
                problems.append(
                    f"{section}: missing from the checkpoint, which holds {sorted(checkpoint)}{hint}"
                )

    for section in SECTIONS:
        if section not in checkpoint:
            continue
        state = checkpoint[section]
        if not isinstance(state, Mapping):
            problems.append(f"{section}: expected a state dict, got {type(state).__name__}")
            continue
        targets = _section_targets(section, heads, prompts)
        if targets is None:
            report.skipped.append(section)
            continue
        module, prefix, names = targets
        if section == "prompt_proj" and module.prompt_bias is None:
            continue  # reported above
        ours = module.state_dict(keep_vars=True)
        covered: set[str] = set()
        for key, tensor in state.items():
            official = f"{section}.{key}"
            if section == "prompt_learner" and key.startswith(_VESTIGIAL):
                report.ignored[official] = "vestigial in the official code (never used)"
                continue
            if section == "prompt_learner" and key in _DERIVED:
                report.ignored[official] = "frozen token embeddings, recomputed from the text tower"
                continue
            if section == "prompt_learner" and key in _TOKEN_IDS:
                problem = _check_token_ids(official, tensor, module.token_ids[_TOKEN_IDS[key]])
                if problem:
                    problems.append(problem)
                else:
                    report.ignored[official] = "prompt token ids, equal to this learner's"
                continue
            if not isinstance(tensor, Tensor):
                problems.append(f"{official}: expected a tensor, got {type(tensor).__name__}")
                continue
            target = names.get(key)
            if target is None or target not in ours:
                hint = ""
                if section == "prompt_proj" and key.startswith("mlp1.") and module.prompt_bias.normal is None:
                    hint = f" (bias_source={module.bias_source!r} has no normal bias map)"
                problems.append(f"{official}: no counterpart in {type(module).__name__}{hint}")
                continue
            source = tensor
            if key in ("ctx_pos", "ctx_neg") and source.ndim > 2 and all(s == 1 for s in source.shape[:-2]):
                source = source.reshape(source.shape[-2:])  # [1, 1, n, W]: one class, one template
            destination = ours[target]
            if source.shape != destination.shape:
                hint = " (a different context length n_ctx?)" if key in ("ctx_pos", "ctx_neg") else ""
                problems.append(
                    f"{official}: shape {tuple(tensor.shape)} does not fit {prefix}{target} "
                    f"{tuple(destination.shape)}{hint}"
                )
                continue
            covered.add(target)
            copies.append((destination, source))
            report.mapped[official] = prefix + target
        expected = {name for name in names.values() if name in ours}
        problems.extend(
            f"{prefix}{name}: not in the checkpoint's {section}" for name in sorted(expected - covered)
        )

    if problems:
        raise OfficialCheckpointError(
            "the official checkpoint does not fit these modules:\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for destination, source in copies:
            destination.copy_(source)
    for key, reason in report.ignored.items():
        log.info("official checkpoint: not loaded %s (%s)", key, reason)
    if report.skipped:
        log.info("official checkpoint: sections without a target module, skipped: %s", report.skipped)
    return report


def _check_token_ids(official: str, tensor: Tensor, ours: Tensor) -> str | None:
    ids = tensor.reshape(-1)
    if ids.shape != ours.shape or not torch.equal(ids.long(), ours.long().cpu()):
        return (
            f"{official}: the checkpoint's prompt tokens differ from this learner's (templates, class word "
            "or n_ctx differ: the official prompts are 'X×12 object.' and 'X×12 damaged object.')"
        )
    return None


def load_official_checkpoint(
    path: str | Path,
    *,
    heads: MRADProjectionHeads | None = None,
    prompts: MRADPromptLearner | None = None,
) -> OfficialCheckpointLoad:
    """Read an official MRAD ``.pth`` file (``weights_only``) and :func:`map_official_checkpoint` it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no official MRAD checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise OfficialCheckpointError(
            f"{path} holds objects other than tensors and state dicts; refusing to unpickle it ({error})"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise OfficialCheckpointError(
            f"{path}: expected a dict of state dicts, got {type(checkpoint).__name__}"
        )
    report = map_official_checkpoint(checkpoint, heads=heads, prompts=prompts)
    log.info("loaded %d tensors from the official checkpoint %s", len(report.mapped), path)
    return report


def official_state_dicts(
    heads: MRADProjectionHeads | None = None, prompts: MRADPromptLearner | None = None
) -> dict[str, dict[str, Tensor]]:
    """The inverse mapping: these modules' tensors in the official checkpoint layout (learnable parts only)."""
    out: dict[str, dict[str, Tensor]] = {}
    for section in SECTIONS:
        targets = _section_targets(section, heads, prompts)
        if targets is None:
            continue
        module, _, names = targets
        ours = module.state_dict()
        state = {key: ours[name].detach().clone() for key, name in names.items() if name in ours}
        if section == "prompt_learner":
            for key in ("ctx_pos", "ctx_neg"):
                state[key] = state[key].reshape(1, 1, *state[key].shape)
        if state:
            out[section] = state
    return out
