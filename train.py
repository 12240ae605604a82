"""Three-stage training of TinyGroundingGPT (paper Table 6), alone or under torchrun, with FSDP2 and bf16.

    python train.py --stage 1                     # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py --stage 1 --qwen=weights/qwen2.5-3b ...
    python train.py --preset shapes               # the tiny model on the shapes world, all stages, on CPU

Stage 1 runs two phases: `pretrain` (projector only, lr 1e-3) then `finetune` (LLM + projector, 2e-5).
Stages 2 and 3 train LLM + projector. The encoders are always frozen (the shapes preset pretrains its tiny
towers first: shapes.pretrain_towers). Each phase exports config.json + model.safetensors + tokenizer.json into
`{out_dir}/{phase}`, which the next phase starts from. Rerunning the same command resumes from the latest
checkpoint in `{out_dir}/{phase}-ckpt`.

Precision policy (one place): with --dtype bfloat16 (the default) the parameters themselves are bf16, so
nothing is cast per step (no autocast, no FSDP2 param_dtype); MasterWeightAdamW keeps an fp32 master copy of
each trainable parameter and updates it in fp32; micro-batch gradients are summed in fp32 (FSDP2: summed and
reduced in fp32, then handed over in bf16). Norms, softmax and the loss are computed in fp32 by model.py.
Exports hold the bf16 weights (what eval and sample run); the masters live in the checkpoints. One process, or
torchrun with one process: no FSDP2.
"""

import argparse
import dataclasses
import inspect
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.optim.adam import adam
from tqdm import tqdm

import data
import download
import shapes
from model import TinyGroundingGPT, image_attention, setup_distributed

# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    stage: str = "1"  # 1, 2, 3, or "all" (1 then 2 then 3)
    preset: str = "paper"  # "paper" (public checkpoints + your data) or "shapes" (tiny, embedded world)
    out_dir: str = "runs/tgg"  # each phase exports to {out_dir}/{phase}; checkpoints, metrics and logs go here too
    init: str = ""  # model dir to start from; default: the previous phase's export in out_dir
    clip: str = "weights/clip-l-336"  # a new model's CLIP: a Hub snapshot dir (python download.py --help)
    dino: str = "weights/dinov2-l"  # a new model's DINOv2: a Hub snapshot dir
    qwen: str = "weights/qwen2.5-3b"  # a new model's Qwen2.5 (with tokenizer.json): a Hub snapshot dir
    image_size: int = 336  # pixels the towers run at (a new model only): CLIP-L/336's own; DINOv2's table resized
    data1: str = ""  # stage 1's data (paper preset): JSON/JSONL files in data.py's sample format, comma-separated
    data2: str = ""  # stage 2's data, as data1
    data3: str = ""  # stage 3's data, as data1
    image_root: str = ""  # the folder that the samples' image paths are relative to
    skip_bad: bool = True  # skip and count bad records instead of stopping (counts printed at the start and end)
    max_missing_images: float = 0.01  # stop before training if a larger share of samples' images is missing (1: go on)
    max_len: int = 2048  # tokens per sample; longer samples are cut (and counted)
    # optimisation (-1: the phase's value from Table 6, PHASES below):
    batch_size: int = -1  # global batch in samples, over all processes and micro-batches (-1: Table 6's)
    micro_batch_size: int = 4  # per process and forward pass; gradient accumulation makes up the rest
    length_group: int = 16  # global batches per length-sorted megabatch (1: group only inside a batch)
    lr: float = -1.0  # peak learning rate (-1: Table 6's for the phase)
    epochs: float = -1.0  # passes over the phase's data (-1: Table 6's)
    max_steps: int = -1  # stop after this many optimizer steps (per phase) even if the epochs are not done
    warmup_ratio: float = 0.03  # share of the steps with a linear warm-up, then cosine decay to zero
    weight_decay: float = 0.0  # AdamW's
    grad_clip: float = 1.0  # clip the global gradient norm to this
    # "token": the loss is the mean over the global batch's answer tokens (LLaVA's); "sample": each sample's
    # answers averaged first, so a one-word answer weighs as much as a paragraph ("": the phase's, PHASES)
    loss_mean: str = ""
    dtype: str = "bfloat16"  # the parameters' dtype: bfloat16 or float32 (master weights and optimizer: always fp32)
    compile: bool = False  # torch.compile each LM block (GPU: faster steps after a minute of compiling)
    activation_checkpointing: bool = False  # recompute each LM block's activations in the backward (less memory)
    num_workers: int = 2  # DataLoader worker processes per training process
    seed: int = 1337  # model init, data order and sample draws
    log_every: int = 1  # optimizer steps between log lines
    ckpt_every: int = 200  # optimizer steps between resumable checkpoints (and one at the end)
    keep_checkpoints: bool = False  # keep {phase}-ckpt after the phase's export (it is ~3x the export's size)
    # weight of box_attention_loss (0: off; the shapes preset: 1), which tells the LM where a box answer's
    # object is in the image
    attention_loss: float = 0.0
    # the stage-2 step from which it applies (stage 2's earlier steps: the answer loss alone). From a random LM
    # it held the answer loss back; `--budget full` adds it once the LM reads boxes (docs/experiments.md)
    attention_loss_from: int = 0
    # shapes preset only (shapes.py):
    budget: str = "quick"  # "quick" (9-21 min on a 2-core CPU) or "full" (~5 h: shapes.FULL_BUDGET's defaults)
    tower_steps: int = 400  # steps of batch 64 pretraining the tiny towers before stage 1 (0: none)
    shapes_samples: str = "3200,3200,28800,6400"  # samples per epoch: stage1 pretrain, finetune, 2, 3
    # stage 2 and 3's mix of sample kinds: "rec:1", "pope:1,rec:1" (shapes.STAGE2_KINDS / STAGE3_KINDS names;
    # default: theirs)
    shapes_kinds: str = ""
    shapes_scene: str = ""  # the training scenes, shapes.SceneConfig fields: "min_objects=2,duplicate_prob=0"


# Table 6 of the paper. "trains": which parts get gradients (the encoders never do in the paper).
PHASES = {
    "stage1-pretrain": dict(trains="projector", lr=1e-3, batch_size=32, epochs=1.0, data="data1", loss_mean="token"),
    "stage1": dict(trains="llm+projector", lr=2e-5, batch_size=32, epochs=1.0, data="data1", loss_mean="token"),
    "stage2": dict(trains="llm+projector", lr=2e-5, batch_size=32, epochs=1.0, data="data2", loss_mean="token"),
    "stage3": dict(trains="llm+projector", lr=2e-5, batch_size=16, epochs=2.0, data="data3", loss_mean="token"),
}
STAGE_PHASES = {"1": ["stage1-pretrain", "stage1"], "2": ["stage2"], "3": ["stage3"]}
STAGE_PHASES["all"] = STAGE_PHASES["1"] + STAGE_PHASES["2"] + STAGE_PHASES["3"]

def field_help() -> dict[str, str]:
    """What `--help` says of each key: the comments of its TrainConfig field (the full-line comments just
    above it and the one after it)."""
    helps, above = {}, []
    for line in inspect.getsource(TrainConfig).splitlines()[2:]:
        line = line.strip()
        if line.startswith("#"):  # a section's heading ends with ":" and describes no field
            above = above if line.endswith(":") else [*above, line.lstrip("# ")]
            continue
        if match := re.match(r"(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line):
            helps[match[1]] = " ".join([*above, match[2] or ""]).strip()
        above = []
    return helps


def parse_args(argv: list[str]) -> TrainConfig:
    """`--key=value` or `--key value` for every TrainConfig field (a bare `--flag` sets it true; `--out-dir`
    spells `--out_dir` too); unknown keys and bad values are errors; `--help` lists every key and default."""

    def boolean(text: str) -> bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise argparse.ArgumentTypeError(f"{text!r} is not one of 1/0/true/false/yes/no")
        return text.lower() in ("1", "true", "yes")

    parser = argparse.ArgumentParser(prog="train.py", usage="%(prog)s [--key=value ...]  (--help lists every key)",
                                     description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    choices = {"stage": list(STAGE_PHASES), "preset": ["paper", "shapes"], "budget": ["quick", "full"],
               "loss_mean": ["token", "sample"]}
    helps = field_help()
    for f in dataclasses.fields(TrainConfig):
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        flag = isinstance(f.default, bool)
        kind = dict(type=boolean, nargs="?", const=True) if flag else dict(type=type(f.default))
        parser.add_argument(*names, dest=f.name, default=None, choices=choices.get(f.name),
                            help=f"{helps.get(f.name, '')} (default: {f.default})".lstrip(), **kind)
    joined, i = [], 0  # "--key value" -> "--key=value", so that values may start with "-" (--lr -1e-3)
    while i < len(argv):
        arg = argv[i]
        pair = arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        joined.append(f"{arg}={argv[i + 1]}" if pair else arg)
        i += 2 if pair else 1
    given = {k: v for k, v in vars(parser.parse_args(joined)).items() if v is not None}
    if given.get("preset") != "shapes":
        if given.get("budget", "quick") != "quick":
            parser.error("--budget is the shapes preset's (add --preset shapes)")
        return TrainConfig(**given)
    budget = shapes.FULL_BUDGET if given.get("budget") == "full" else {}
    return TrainConfig(**{**shapes.PRESET, **budget, **given})


@dataclass
class PhaseSettings:
    """What one phase trains and how, after the stage defaults and the user's overrides are resolved."""

    name: str
    trains: str
    lr: float
    batch_size: int
    epochs: float
    loss_mean: str
    data: list[str] = field(default_factory=list)


def resolve_phase(cfg: TrainConfig, name: str) -> PhaseSettings:
    base = dict(PHASES[name])
    if cfg.preset == "shapes":
        base.update(shapes.PHASE_SETTINGS[name])
    pick = lambda ours, default: ours if ours > 0 else default
    files = [p for p in getattr(cfg, base["data"]).split(",") if p] if cfg.preset == "paper" else []
    return PhaseSettings(
        name,
        base["trains"],
        pick(cfg.lr, base["lr"]),
        pick(cfg.batch_size, base["batch_size"]),
        pick(cfg.epochs, base["epochs"]),
        cfg.loss_mean or base["loss_mean"],
        files,
    )


# ----------------------------------------------------------------------------- distributed set-up


def all_reduce_sum(value: float | int, device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- the model of a phase


def start_dir(cfg: TrainConfig, phase: PhaseSettings) -> str:
    """The exported model the phase starts from ("" for a new model); exits naming what to run or download when
    that export, or a new model's public checkpoints, are not there."""
    previous = {"stage1": "stage1-pretrain", "stage2": "stage1", "stage3": "stage2"}.get(phase.name)
    if phase.name == "stage1-pretrain" and cfg.preset == "shapes" and cfg.tower_steps > 0:
        previous = "towers"
    init = cfg.init if (cfg.init and phase.name == STAGE_PHASES[cfg.stage][0]) else ""
    if not init and previous:
        init = os.path.join(cfg.out_dir, previous)
        if not os.path.exists(os.path.join(init, "config.json")):
            sys.exit(
                f"error: {phase.name} starts from {previous}'s export, but {init}/config.json does not exist.\n"
                f"Run the earlier stage first (python train.py --stage {previous[5]} --out_dir={cfg.out_dir} "
                "...), or point --init at an exported model directory."
            )
    if not init and cfg.preset == "paper":  # a new model from the three public checkpoints
        for name, path in [("clip", cfg.clip), ("dino", cfg.dino), ("qwen", cfg.qwen)]:
            if not os.path.exists(os.path.join(path, "config.json")):
                repo = download.repo_for(path, name)
                sys.exit(
                    f"error: --{name}={path} has no config.json. Download the Hub snapshot of {repo} there "
                    f"(python download.py {repo} --out {path}), or point --{name} at it."
                )
    return init


def build_model(cfg: TrainConfig, init: str, device) -> tuple[TinyGroundingGPT, str, str]:
    """The phase's starting model (fp32 master weights): the export `init`, else a new one; the tokenizer.json
    that goes with it, and where the model came from (for the log)."""
    if init:
        try:
            model = TinyGroundingGPT.from_pretrained(init, dtype=torch.float32, device=device)
        except FileNotFoundError as e:
            sys.exit(f"error: the phase starts from {init}: {e}")
        return model, os.path.join(init, "tokenizer.json"), init
    if cfg.preset == "shapes":
        return shapes.new_model(cfg.max_len).to(device), shapes.SHAPES_TOKENIZER, "a new random shapes model"
    model = TinyGroundingGPT.from_components(cfg.clip, cfg.dino, cfg.qwen, image_size=cfg.image_size).to(device)
    return model, os.path.join(cfg.qwen, "tokenizer.json"), f"{cfg.clip} + {cfg.dino} + {cfg.qwen}"


def set_trainable(model: TinyGroundingGPT, trains: str) -> None:
    """Freeze everything, then unfreeze the parts the phase trains: "projector" or "llm+projector" (the model's
    attributes; the towers stay frozen, as in the paper)."""
    model.requires_grad_(False)
    for part in trains.split("+"):
        getattr(model, part).requires_grad_(True)


def shard(model: TinyGroundingGPT) -> None:
    """FSDP2: each transformer block is its own shard group, then the root (torchtitan's recipe). The
    parameters are all-gathered in their own dtype (bf16: no casts); gradients are summed and reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    blocks = list(model.llm.layers) + [b for tower in model.encoder.towers for b in tower.blocks]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up for the first warmup_ratio of the steps, then cosine decay to zero."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW whose update is fp32 whatever the parameters' dtype, so that a bf16 model computes with no casts
    and small updates are not lost to bf16 rounding. For each bf16 parameter its state keeps an fp32 master
    copy ("master") next to Adam's moments; gradients are summed in fp32 as they arrive (a hook per parameter,
    which frees the bf16 gradient; under FSDP2 the gradient arrives reduced in fp32, then rounded to bf16 by
    FSDP2); each step updates the masters (torch.optim.adam.adam, as AdamW does) and writes them into the bf16
    weights. fp32 parameters are their own masters: then this is AdamW, step for step (tests/test_train.py)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8):
        super().__init__(list(params), dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))
        self.grads: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its fp32 gradient so far
        me = weakref.ref(self)  # a parameter's hook must not keep its optimizer (and all its state) alive

        def hook(p):
            if (optimizer := me()) is not None:
                optimizer.take_grad(p)
        self.hooks = [p.register_post_accumulate_grad_hook(hook) for group in self.param_groups
                      for p in group["params"]]
        weakref.finalize(self, lambda handles: [h.remove() for h in handles], self.hooks)

    def take_grad(self, p: torch.Tensor) -> None:
        """Move p's new gradient into its fp32 sum (FSDP2 calls this after its reduce-scatter)."""
        if p.grad is None:
            return
        if p in self.grads:
            self.grads[p].add_(p.grad)
        else:
            self.grads[p] = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
        p.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the fp32 gradients to a global norm of at most max_norm; returns the norm before (a DTensor
        under FSDP2)."""
        # in the parameters' order, not the backward's: the same sum as torch's clip_grad_norm_
        grads = [self.grads[p] for group in self.param_groups for p in group["params"] if p in self.grads]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads)
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # a gradient set by hand (DCP's state initialisation does)
                    self.take_grad(p)
            params = [p for p in group["params"] if p in self.grads]
            for p in params:
                if not self.state[p]:
                    master = {} if p.dtype == torch.float32 else {"master": p.detach().float()}
                    self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                         exp_avg_sq=torch.zeros_like(p, dtype=torch.float32), **master)
            state = [self.state[p] for p in params]
            masters = [s.get("master", p) for s, p in zip(state, params)]
            adam(
                masters, [self.grads[p] for p in params], [s["exp_avg"] for s in state],
                [s["exp_avg_sq"] for s in state], [], [s["step"] for s in state], amsgrad=False,
                beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False, decoupled_weight_decay=True)
            for p, master in zip(params, masters):
                if master is not p:
                    p.copy_(master)
        self.grads.clear()

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        self.grads.clear()

    def load_state_dict(self, state_dict: dict):
        """torch's loader casts every state tensor to its parameter's dtype (bf16 here): put the fp32 back."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        for i, p in zip(ids, (p for group in self.param_groups for p in group["params"])):
            for key, value in saved.get(i, {}).items():
                if key != "step":
                    self.state[p][key] = value.to(p.device)


# ----------------------------------------------------------------------------- data order


class StepBatches:
    """The micro-batches of this rank, step by step, from `start_step` on.

    Epoch e shuffles the samples with a permutation seeded by (seed, e) and cuts it into megabatches of
    `group` global batches; each megabatch is sorted by length and cut into global batches, which its steps
    visit in a seeded order (LLaVA's length grouping: little padding, still random). A global batch is cut
    into world_size contiguous slices, one per rank, each into micro-batches. The step alone fixes the data,
    so a resumed run sees exactly what an uninterrupted one would, and any world size sees the same batches.
    """

    def __init__(
        self,
        lengths: "data.SampleLengths | list[int]",
        batch_size: int,
        micro: int,
        rank: int,
        world: int,
        seed: int,
        start_step: int,
        total_steps: int,
        group: int = 1,
    ):
        if batch_size % world:
            sys.exit(f"error: the global batch ({batch_size}) must be divisible by the world size ({world})")
        self.lengths, self.batch_size, self.rank, self.world = lengths, batch_size, rank, world
        self.seed, self.start_step, self.total_steps, self.group = seed, start_step, total_steps, max(1, group)
        self.micro = min(micro, batch_size // world)
        self.steps_per_epoch = len(lengths) // batch_size
        self._permutation, self._megabatch = (None, None), (None, None)  # (key, value) of the last computed
        if self.steps_per_epoch == 0:
            sys.exit(f"error: the dataset has {len(lengths)} samples, fewer than one global batch ({batch_size})")

    def step_indices(self, step: int) -> list[list[int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        B, mega, within = self.batch_size, *divmod(pos, self.group)
        members, order = self.megabatch(epoch, mega)
        batch = members[order[within] * B : (order[within] + 1) * B]
        per_rank = B // self.world
        mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [mine[i : i + self.micro] for i in range(0, per_rank, self.micro)]

    def megabatch(self, epoch: int, mega: int) -> tuple[list[int], list[int]]:
        """Megabatch `mega` of `epoch`: its samples sorted by length, and the order its global batches go in.
        Kept for the megabatch's other steps (as the epoch's permutation is for its other megabatches)."""
        if self._megabatch[0] != (epoch, mega):
            if self._permutation[0] != epoch:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._permutation = (epoch, torch.randperm(len(self.lengths), generator=generator))
            B, end = self.batch_size, min((mega + 1) * self.group, self.steps_per_epoch)
            members = self._permutation[1][mega * self.group * B : end * B].tolist()
            members.sort(key=lambda i: self.lengths[i])  # stable: ties keep the permutation's order
            order = torch.randperm(
                len(members) // B,
                generator=torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + mega),
            ).tolist()
            self._megabatch = ((epoch, mega), (members, order))
        return self._megabatch[1]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield from self.step_indices(step)

    def accumulation(self) -> int:
        return math.ceil(self.batch_size // self.world / self.micro)


# ----------------------------------------------------------------------------- checkpoints


class MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle, and unpickling runs whatever it names. This one finds only what DCP
    writes there (its metadata classes, torch.Size, dtypes, paths), so a planted payload fails to load."""

    DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                   "torch.distributed.checkpoint.planner")
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        named = module in self.DCP_MODULES or module == "torch" or (module, name) in self.ALLOWED
        found = super().find_class(module, name) if named and "." not in name else None  # imports the module
        dcp_class = module in self.DCP_MODULES and isinstance(found, type) and found.__module__ == module
        dtype = module == "torch" and isinstance(found, torch.dtype)
        if found is None or not (dcp_class or dtype or (module, name) in self.ALLOWED):
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata: refusing it")
        return found


def checkpoint_reader(path: str):
    """DCP's file reader, its metadata read by MetadataUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(path, ".metadata"), "rb") as f:
                metadata = MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def verified(path: str) -> bool:
    """Whether checkpoint `path` is complete and intact: its manifest lists every file with its sha256."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        return all(download.file_sha256(os.path.join(path, name)) == digest for name, digest in manifest.items())
    except (OSError, ValueError, AttributeError):
        return False


def find_checkpoint(ckpt_dir: str, rank: int) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint that verifies (rank 0 checks, every rank gets its answer); a
    damaged one is named and the one before it used."""
    found = None
    if rank == 0 and os.path.isdir(ckpt_dir):
        for name in sorted((n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step-\d{7}", n)), reverse=True):
            if verified(os.path.join(ckpt_dir, name)):
                found = (os.path.join(ckpt_dir, name), int(name.split("-")[1]))
                break
            print(f"warning: checkpoint {os.path.join(ckpt_dir, name)} is incomplete or damaged (its files do not "
                  "match its manifest.json); trying the one before it", flush=True)
    if dist.is_initialized():
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    return found


def check_plan(path: str, plan: dict) -> None:
    """Refuse to resume checkpoint `path` under another plan (samples, steps, batch, seed, lr...): its step
    would index another data order and learning-rate schedule. Checkpoints without plan.json predate it."""
    plan_path = os.path.join(path, "plan.json")
    if not os.path.exists(plan_path):
        return
    with open(plan_path) as f:
        saved = json.load(f)
    saved.setdefault("loss_mean", "token")  # a plan written before the setting existed
    changed = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in plan.items() if saved.get(k) != v]
    if changed:
        raise SystemExit(f"{path} was written by a run with other settings ({'; '.join(changed)}): rerun the "
                         f"command that wrote it, or delete {os.path.dirname(path)} to train this phase afresh")


def save_checkpoint(model, optimizer, ckpt_dir: str, step: int, rank: int, plan: dict | None = None) -> None:
    """Sharded, resumable state (model, optimizer, RNG; the data position is the step itself), the run's plan
    (check_plan) and a manifest of its files' sha256, each rank hashing what it wrote. The checkpoint before
    it is deleted only once this one is complete, and is kept as the fallback for a damaged one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.path.join(ckpt_dir, f"step-{step:07d}")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    torch.save(
        {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}, os.path.join(path, f"rng-{rank}.pt")
    )
    if rank == 0 and plan is not None:
        data.atomic_write(os.path.join(path, "plan.json"), json.dumps(plan, indent=1))
    barrier()
    mine = [n for n in os.listdir(path) if re.fullmatch(rf"(__{rank}_\d+\.distcp|rng-{rank}\.pt)", n)]
    digests = {n: download.file_sha256(os.path.join(path, n)) for n in mine + ([".metadata"] if rank == 0 else [])}
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, digests)
        digests = {k: v for part in parts for k, v in part.items()}
    if rank == 0:  # only now is the new checkpoint complete: its manifest, then the pointer, then the cleanup
        missed = set(os.listdir(path)) - set(digests)
        digests.update({n: download.file_sha256(os.path.join(path, n)) for n in missed})
        data.atomic_write(os.path.join(path, "manifest.json"), json.dumps(digests, indent=1))
        data.atomic_write(os.path.join(ckpt_dir, "latest"), os.path.basename(path))
        steps = sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step-\d{7}", n))
        for old in steps[:-2]:  # keep this one and the one before it
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()


def load_checkpoint(model, optimizer, path: str, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=checkpoint_reader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = os.path.join(path, f"rng-{rank}.pt")
    if not os.path.exists(rng_path):  # resumed on more processes than wrote it: a fresh, distinct stream
        print(f"rank {rank}: {path} has no rng-{rank}.pt (written by fewer processes); seeding its RNG anew")
        torch.manual_seed(int(re.sub(r"\D", "", os.path.basename(path)) or 0) * 1000 + rank)
        return
    rng = torch.load(rng_path, weights_only=True)  # tensors only: no pickle runs
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def export(model, out: str, tokenizer_path: str, rank: int) -> None:
    """Gather the full weights and write config.json + model.safetensors + tokenizer.json (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        TinyGroundingGPT.save_state(state, model.config, out, tokenizer_path)
    barrier()


# ----------------------------------------------------------------------------- logging


def draw_loss_curve(losses: list[float], path: str, title: str) -> None:
    """A loss-vs-step PNG with nothing but pillow."""
    from PIL import Image, ImageDraw

    width, height, pad = 640, 360, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    points = [
        (pad + (width - 2 * pad) * i / max(1, len(losses) - 1), height - pad - (height - 2 * pad) * (v - lo) / span)
        for i, v in enumerate(losses)
    ]
    draw.rectangle([pad, pad, width - pad, height - pad], outline="gray")
    if len(points) > 1:
        draw.line(points, fill="navy", width=2)
    draw.text((pad, 10), f"{title}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps", fill="black")
    draw.text((5, pad - 5), f"{hi:.2f}", fill="black")
    draw.text((5, height - pad - 5), f"{lo:.2f}", fill="black")
    img.save(path)


def flops_per_token(model: TinyGroundingGPT, seq_len: int) -> float:
    """6N + 12·L·H·Q·T for the LLM (the usual MFU count); the towers' forward is small next to it and left out."""
    c = model.config.llm
    params = sum(p.numel() for p in model.llm.parameters())
    return 6 * params + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def peak_flops(device) -> float:
    if device.type != "cuda":
        return 0.0  # MFU is only printed on GPUs
    name = torch.cuda.get_device_name(device)
    return 312e12 if "A100" in name else 989e12


# ----------------------------------------------------------------------------- shapes: tower pretraining


def pretrain_shapes_towers(cfg: TrainConfig, rank: int, device) -> None:
    """The shapes preset's `towers` phase (shapes.pretrain_towers), exported to `{out_dir}/towers` for stage 1
    to start from. Rank 0 trains (minutes; not checkpointed: a rerun after a crash starts it over)."""
    out = os.path.join(cfg.out_dir, "towers")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        if rank == 0:
            print(f"towers: already exported to {out}; skipping (delete it to train again)")
        return
    if rank == 0:
        torch.manual_seed(cfg.seed)
        model, t_start, peak = shapes.new_model(cfg.max_len).to(device), time.time(), 2e-3
        shapes.pretrain_towers(model, cfg.tower_steps, cfg.seed, lambda step: lr_at(step, cfg.tower_steps, peak,
                               cfg.warmup_ratio), cfg.num_workers, cfg.log_every, cfg.grad_clip)
        model.save_pretrained(out, shapes.SHAPES_TOKENIZER)
        print(f"towers: done in {(time.time() - t_start) / 60:.1f} min, exported to {out}")
    barrier()


# ----------------------------------------------------------------------------- one phase


def box_attention_loss(batch: dict, attn: torch.Tensor, tokenizer, image_token_id: int, positions: int = 6):
    """For the rows whose answer starts with a box (REC): -log of the last layer's attention, mean over heads,
    on the image patches whose centres lie inside that box, at the `positions` positions that write the
    answer's first tokens; the mean over those rows (0 without any). attn: [B, heads, L, L]. The answer loss
    alone never taught the shapes LM to look where the question points (docs/experiments.md); this says where."""
    ids, labels, terms = batch["input_ids"], batch["labels"], []
    for row in range(ids.shape[0]):
        answer = (labels[row] != -100).nonzero().flatten()
        patches = (ids[row] == image_token_id).nonzero().flatten()
        side = math.isqrt(len(patches))
        if len(answer) == 0 or side == 0 or side * side != len(patches):
            continue
        first = int(answer[0])
        match = data.BOX_RE.match(tokenizer.decode(ids[row, first : first + 40].tolist()))
        if not match:
            continue
        inside = data.patches_in_box([float(g) for g in match.groups()], side).to(attn.device)
        if inside.any():
            queries = list(range(first - 1, min(first - 1 + positions, ids.shape[1])))
            look = image_attention(attn[row], ids[row], queries, image_token_id)  # [positions, P]
            terms.append(-(look[:, inside].sum(-1) + 1e-4).log().mean())
    return torch.stack(terms).mean() if terms else attn.new_zeros((), dtype=torch.float)


def shapes_stage_data(cfg: TrainConfig, name: str) -> shapes.ShapesStageData:
    """One phase's shapes samples (drawn on the fly). A bad --shapes_* value exits naming the flag."""
    try:
        return shapes.stage_data(name, cfg.shapes_samples, cfg.shapes_kinds, cfg.shapes_scene, cfg.seed)
    except ValueError as e:
        sys.exit(f"error: --shapes_samples={cfg.shapes_samples} --shapes_scene={cfg.shapes_scene} "
                 f"--shapes_kinds={cfg.shapes_kinds}: {e}")


def load_phase_samples(cfg: TrainConfig, phase: PhaseSettings, rank: int) -> list[dict]:
    """The phase's data files, checked before any training: bad records are counted (and said now), and when
    more than cfg.max_missing_images of the samples' images are missing (a wrong --image_root, an unfinished
    download) the run stops naming the first one."""
    if not phase.data:
        key = PHASES[phase.name]["data"]
        sys.exit(
            f"error: {phase.name} needs training data: --{key}=FILE.json[,FILE2.jsonl] in data.py's sample "
            "format (python data.py --help lists the converters for LLaVA, RefCOCO, Visual Genome, ...)"
        )
    for path in phase.data:
        if not os.path.isfile(path):
            sys.exit(f"error: --{PHASES[phase.name]['data']}: {path} does not exist")
    counter = data.SkipCounter() if cfg.skip_bad else None
    samples = data.load_samples(phase.data, image_root=cfg.image_root, skip_bad=counter)
    if counter is None:
        return samples
    for reason, n in counter.totals().items():
        data.SKIPPED.counts[0, data.SkipCounter.REASONS.index(reason)] += n  # the phase's end-of-run summary
    missing = counter.totals().get("missing image", 0)
    share = missing / max(1, missing + len(samples))
    if share > cfg.max_missing_images:
        sys.exit(
            f"error: {missing} of {missing + len(samples)} samples in {','.join(phase.data)} have no image "
            f"({100 * share:.1f}% > --max_missing_images={cfg.max_missing_images:g}); the first: "
            f"{counter.first['missing image']}. Check --image_root={cfg.image_root!r} (image paths are relative "
            "to it), or pass --max_missing_images=1 to train without them."
        )
    if rank == 0:
        print(f"{phase.name}: {len(samples)} samples from {','.join(phase.data)}; skipped: {counter}"
              + (f" (first: {next(iter(counter.first.values()))})" if counter.first else ""))
    return samples


def prepare_model(cfg: TrainConfig, phase: PhaseSettings, init: str, rank: int, device):
    """The phase's model, ready to train: built or loaded, what the phase trains unfrozen, blocks compiled and
    sharded as asked; with its tokenizer.json."""
    torch.manual_seed(cfg.seed)
    model, tokenizer_path, source = build_model(cfg, init, device)
    if rank == 0:
        print(f"{phase.name}: starts from {source}")
    set_trainable(model, phase.trains)
    if cfg.dtype == "bfloat16":  # the optimizer keeps the fp32 masters (MasterWeightAdamW)
        model.to(torch.bfloat16)
    if cfg.activation_checkpointing:
        model.llm.activation_checkpointing = True
    if cfg.compile:
        for block in model.llm.layers:
            block.compile()
    if dist.is_initialized() and dist.get_world_size() > 1:
        shard(model)
    return model, tokenizer_path


def train_step(model, optimizer: MasterWeightAdamW, micro_batches: list[dict], lr: float, cfg: TrainConfig,
               tokenizer, world: int, device, t0: float, look_weight: float, loss_mean: str = "token") -> dict:
    """One optimizer step over the global batch's micro-batches of this process -> its log record.

    The loss is the mean over all answer tokens of the global batch (loss_mean "sample": over all samples,
    each its answer tokens' mean), whatever the split into processes and micro-batches: each micro-batch's
    mean is reweighted by its share of the tokens (samples), x world size because FSDP averages gradients
    over processes. t0: when the step began (the batches' loading is part of it). look_weight:
    box_attention_loss's weight in the objective this step (0: off)."""
    sharded = hasattr(model, "set_requires_gradient_sync")  # an FSDP2 module
    answered = [b["labels"][:, 1:] != -100 for b in micro_batches]  # [B, L-1] each
    counts = [int(a.any(1).sum() if loss_mean == "sample" else a.sum()) for a in answered]
    total = max(1.0, all_reduce_sum(sum(counts), device))
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, look_sum, n_tokens, n_padded = 0.0, 0.0, 0, 0
    for i, batch in enumerate(micro_batches):
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if sharded:
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        if look_weight:  # the eager attention path, for its probabilities
            _, loss, attn = model(**batch, return_last_attn=True, loss_mean=loss_mean)
            look = box_attention_loss(batch, attn, tokenizer, model.config.image_token_id)
            look_sum += look.item() / len(micro_batches)
        else:
            _, loss = model(**batch, loss_mean=loss_mean)
        objective = loss + look_weight * look if look_weight else loss
        (objective * (counts[i] / total * world)).backward()
        loss_sum += loss.item() * counts[i]
        n_tokens += int(batch["attention_mask"].sum())
        n_padded += batch["attention_mask"].numel()
    grad_norm = optimizer.clip_grad_norm_(cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.time() - t0
    return dict(
        loss=round(all_reduce_sum(loss_sum, device) / total, 5),
        lr=lr,
        grad_norm=round(grad_norm, 4),
        tokens_per_s=round(all_reduce_sum(n_tokens, device) / dt, 1),
        padding=round(1 - n_tokens / max(1, n_padded), 4),  # this process's share of padded positions
        dt=round(dt, 4),
        **({"attention_loss": round(all_reduce_sum(look_sum, device) / world, 4)} if look_weight else {}),
    )


def log_line(name: str, step: int, total: int, record: dict, mfu: float, eta_s: float, device) -> str:
    """The one dense line a step prints."""
    mem = f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB" if device.type == "cuda" else ""
    look = f"attn loss {record['attention_loss']:.3f} | " if "attention_loss" in record else ""
    return (f"{name} {step + 1:>6}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"gnorm {record['grad_norm']:.2f} | {record['tokens_per_s']:,.0f} tok/s"
            + (f" | mfu {100 * mfu:.1f}%" if mfu else "") + f"{mem} | {look}eta {eta_s / 60:.1f}min")


def train_phase(cfg: TrainConfig, phase: PhaseSettings, rank: int, world: int, device) -> None:
    """One phase: its inputs checked, its model prepared, resumed from its newest checkpoint, trained step by
    step (checkpoints every ckpt_every steps) and exported to {out_dir}/{phase}."""
    out = os.path.join(cfg.out_dir, phase.name)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        if rank == 0:
            print(f"{phase.name}: already exported to {out}; skipping (delete it to train again)")
        return
    # the inputs before the model: a wrong path fails in seconds, not after loading billions of weights
    init = start_dir(cfg, phase)
    samples = shapes_stage_data(cfg, phase.name) if cfg.preset == "shapes" else load_phase_samples(cfg, phase, rank)
    model, tokenizer_path = prepare_model(cfg, phase, init, rank, device)
    tokenizer = data.Tokenizer.from_file(tokenizer_path)
    dataset = data.SFTDataset(samples, tokenizer, model.encoder.processor, model.num_image_tokens,
                              model.config.object_tokens, max_len=cfg.max_len, skip_bad=cfg.skip_bad)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding, which replaces them
    optimizer = MasterWeightAdamW(trainable, lr=phase.lr, weight_decay=cfg.weight_decay)
    ckpt_dir = os.path.join(cfg.out_dir, f"{phase.name}-ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    total = math.ceil(phase.epochs * (len(dataset) // phase.batch_size))
    total = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
    plan = {"samples": len(dataset), "steps": total, "batch_size": phase.batch_size, "lr": phase.lr,
            "seed": cfg.seed, "warmup_ratio": cfg.warmup_ratio, "length_group": cfg.length_group,
            "loss_mean": phase.loss_mean}
    start = 0
    if found := find_checkpoint(ckpt_dir, rank):
        check_plan(found[0], plan)
        load_checkpoint(model, optimizer, found[0], rank)
        start = found[1]
    batches = StepBatches(
        dataset.lengths, phase.batch_size, cfg.micro_batch_size, rank, world, cfg.seed, start, total, cfg.length_group
    )
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data.collate,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    accumulation = batches.accumulation()
    if rank == 0:
        print(
            f"{phase.name}: {len(dataset)} samples, {total} steps of {phase.batch_size} "
            f"({world} process(es) x {accumulation} micro-batches of {batches.micro}), lr {phase.lr:g}, "
            f"trains {sum(p.numel() for p in trainable) / 1e6:.2f}M params, loss: mean per {phase.loss_mean}"
            + (f", resuming at step {start}" if start else "")
        )
    metrics_path = os.path.join(cfg.out_dir, f"{phase.name}.metrics.jsonl")
    history = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) and start else []
    history = [h for h in history if h["step"] < start]  # a crash may have logged steps after the checkpoint
    peak, fpt = peak_flops(device), flops_per_token(model, cfg.max_len)
    micro_iter = iter(loader)
    bar = tqdm(total=total, initial=start, desc=phase.name, disable=rank != 0 or not sys.stderr.isatty(),
               dynamic_ncols=True, leave=False)
    model.train()
    t_start = time.time()
    for step in range(start, total):
        t0 = time.time()
        micro_batches = [next(micro_iter) for _ in range(accumulation)]
        lr = lr_at(step, total, phase.lr, cfg.warmup_ratio)
        look = cfg.attention_loss if phase.name != "stage2" or step >= cfg.attention_loss_from else 0.0
        record = {"step": step, **train_step(model, optimizer, micro_batches, lr, cfg, tokenizer, world, device, t0,
                                             look, phase.loss_mean)}
        history.append(record)
        bar.update(1)
        if rank == 0 and (step % cfg.log_every == 0 or step == total - 1):
            mfu = fpt * record["tokens_per_s"] / (peak * world) if peak else 0.0
            eta = (time.time() - t_start) / (step + 1 - start) * (total - step - 1)
            tqdm.write(log_line(phase.name, step, total, record, mfu, eta, device))
            sys.stdout.flush()  # one line per step also when stdout is a file
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == total:
            if rank == 0:  # the metrics first: a checkpoint that exists has its history (resume drops the excess)
                data.atomic_write(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
            save_checkpoint(model, optimizer, ckpt_dir, step + 1, rank, plan)
    bar.close()
    export(model, out, tokenizer_path, rank)
    if rank == 0:
        finish_phase(cfg, phase.name, out, ckpt_dir, history, time.time() - t_start)


def finish_phase(cfg: TrainConfig, name: str, out: str, ckpt_dir: str, history: list[dict], seconds: float):
    """After the export: the checkpoints removed (unless kept), the loss curve drawn, the summary printed."""
    if not cfg.keep_checkpoints:  # the export is complete and is what the next phase starts from
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if history:
        draw_loss_curve([h["loss"] for h in history], os.path.join(cfg.out_dir, f"{name}.loss.png"), name)
    padding = sum(h.get("padding", 0.0) for h in history) / max(1, len(history))
    print(f"{name}: done in {seconds / 60:.1f} min, exported to {out}; {100 * padding:.1f}% of positions were "
          f"padding; bad input: {data.SKIPPED}")


def main(argv: list[str]) -> None:
    cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    if cfg.preset == "shapes" and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        settings = json.dumps(dataclasses.asdict(cfg), indent=1)
        print(settings)
        data.atomic_write(os.path.join(cfg.out_dir, f"config-stage{cfg.stage}.json"), settings)
    for name in STAGE_PHASES[cfg.stage] if cfg.preset == "shapes" else []:  # bad --shapes_* values stop the
        shapes_stage_data(cfg, name)  # run now, not at the stage they concern
    if cfg.preset == "shapes" and cfg.tower_steps > 0 and cfg.stage in ("1", "all") and not cfg.init:
        pretrain_shapes_towers(cfg, rank, device)
    for name in STAGE_PHASES[cfg.stage]:
        train_phase(cfg, resolve_phase(cfg, name), rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
