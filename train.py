"""Three-stage training of TinyGroundingGPT (paper Table 6), alone or under torchrun, with FSDP2 and bf16.

    python train.py --stage 1                     # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py --stage 1 --qwen=weights/qwen2.5-3b ...
    python train.py --preset shapes               # the tiny model on the shapes world, all stages, on CPU

Stage 1 runs two phases: `pretrain` (projector only, lr 1e-3) then `finetune` (LLM + projector, 2e-5).
Stages 2 and 3 train LLM + projector. The encoders are always frozen (the shapes preset pretrains its tiny
towers first, see `pretrain_towers`). Each phase exports config.json + model.safetensors + tokenizer.json into
`{out_dir}/{phase}`, which the next phase starts from. Rerunning the same command resumes from the latest
checkpoint in `{out_dir}/{phase}-ckpt`.

Precision policy (one place): fp32 master weights and optimizer state; bf16 compute (FSDP2's param_dtype, or
autocast when not sharded); gradients reduced in fp32; norms, softmax and the loss computed in fp32 by model.py.
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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import download
import shapes
from encoders import ImageProcessor, VisionConfig
from model import Qwen2Config, TinyGroundingGPT, TinyGroundingGPTConfig

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
    dtype: str = "bfloat16"  # compute dtype: bfloat16 or float32 (master weights and optimizer: always fp32)
    compile: bool = False  # torch.compile each LM block (GPU: faster steps after a minute of compiling)
    activation_checkpointing: bool = False  # recompute each LM block's activations in the backward (less memory)
    num_workers: int = 2  # DataLoader worker processes per training process
    seed: int = 1337  # model init, data order and sample draws
    # where the image's tokens stand in the first question (the model's config.json keeps it for eval/sample):
    # False = before it, LLaVA's and the paper's order
    image_after_question: bool = False
    log_every: int = 1  # optimizer steps between log lines
    ckpt_every: int = 200  # optimizer steps between resumable checkpoints (and one at the end)
    keep_checkpoints: bool = False  # keep {phase}-ckpt after the phase's export (it is ~3x the export's size)
    # shapes preset only:
    tower_steps: int = 400  # steps of batch 64 pretraining the tiny towers before stage 1 (0: none)
    tower_digits: bool = False  # the towers also learn the digits of each box coordinate (helps short runs only)
    train_towers: bool = False  # also train the towers in the stages (the paper freezes them)
    shapes_samples: str = "3200,3200,28800,6400"  # samples per epoch: stage1 pretrain, finetune, 2, 3
    shapes_rounds: int = 1  # stage-2 questions per image (each about another object of the scene)
    # stage 2 and 3's mix of sample kinds: "rec:1", "pope:1,rec:1" (shapes.STAGE2_KINDS / STAGE3_KINDS names;
    # default: theirs)
    shapes_kinds: str = ""
    shapes_scene: str = ""  # the training scenes, shapes.SceneConfig fields: "min_objects=2,duplicate_prob=0"
    # weight of box_attention_loss (0: off; the shapes preset: 1), which tells the LM where a box answer's
    # object is in the image
    attention_loss: float = 0.0
    llm_width: int = 128  # the shapes LM's width, MLP 3x (a new model only: later phases keep their init's)
    llm_layers: int = 4  # the shapes LM's blocks (a new model only)
    llm_heads: int = 4  # the shapes LM's query heads (a new model only)
    llm_kv_heads: int = 2  # the shapes LM's key/value heads (a new model only)


# Table 6 of the paper. "trains": which parts get gradients (the encoders never do in the paper).
PHASES = {
    "stage1-pretrain": dict(trains="projector", lr=1e-3, batch_size=32, epochs=1.0, data="data1"),
    "stage1": dict(trains="llm+projector", lr=2e-5, batch_size=32, epochs=1.0, data="data1"),
    "stage2": dict(trains="llm+projector", lr=2e-5, batch_size=32, epochs=1.0, data="data2"),
    "stage3": dict(trains="llm+projector", lr=2e-5, batch_size=16, epochs=2.0, data="data3"),
}
STAGE_PHASES = {"1": ["stage1-pretrain", "stage1"], "2": ["stage2"], "3": ["stage3"]}
STAGE_PHASES["all"] = STAGE_PHASES["1"] + STAGE_PHASES["2"] + STAGE_PHASES["3"]

# The shapes preset: a tiny model trained from scratch in minutes on a CPU. Values measured, see README.
SHAPES_PRESET = dict(
    out_dir="runs/shapes",
    stage="all",
    micro_batch_size=32,
    # fp32: on a CPU, bf16 autocast made the step no faster here (its attention backward is slow), and the
    # a pre-project prototype (2.8M parameters) went to NaN in bf16 on a GPU
    dtype="float32",
    num_workers=1,
    ckpt_every=100,
    log_every=25,
    max_len=256,
    # length-sorted megabatches give batches of one sample kind here (lengths follow the kind); a stage-2 run
    # with them spiked at step 276 and collapsed to repeated digits (1% testA at step 500), so: mixed batches
    length_group=1,
    # the answer loss alone never taught the shapes LM to look where the question points; this loss did
    # (README, "What moved it"); the quickstart takes ~7% longer with it
    attention_loss=1.0,
)
SHAPES_PHASES = {  # from-scratch weights need far larger learning rates than fine-tuning a pretrained LLM
    "stage1-pretrain": dict(lr=2e-3, batch_size=32, epochs=1.0),
    "stage1": dict(lr=1e-3, batch_size=32, epochs=1.0),
    "stage2": dict(lr=2e-3, batch_size=32, epochs=1.0),
    "stage3": dict(lr=5e-4, batch_size=32, epochs=1.0),
}


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
    choices, helps = {"stage": list(STAGE_PHASES), "preset": ["paper", "shapes"]}, field_help()
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
    return TrainConfig(**{**(SHAPES_PRESET if given.get("preset") == "shapes" else {}), **given})


@dataclass
class PhaseSettings:
    """What one phase trains and how, after the stage defaults and the user's overrides are resolved."""

    name: str
    trains: str
    lr: float
    batch_size: int
    epochs: float
    data: list[str] = field(default_factory=list)


def resolve_phase(cfg: TrainConfig, name: str) -> PhaseSettings:
    base = dict(PHASES[name])
    if cfg.preset == "shapes":
        base.update(SHAPES_PHASES[name])
    pick = lambda ours, default: ours if ours > 0 else default
    files = [p for p in getattr(cfg, base["data"]).split(",") if p] if cfg.preset == "paper" else []
    return PhaseSettings(
        name,
        base["trains"],
        pick(cfg.lr, base["lr"]),
        pick(cfg.batch_size, base["batch_size"]),
        pick(cfg.epochs, base["epochs"]),
        files,
    )


# ----------------------------------------------------------------------------- distributed set-up


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: NCCL on GPUs, gloo on CPUs; alone: no process group."""
    cuda = torch.cuda.is_available()
    if cuda:  # TF32 for the fp32 matmuls and convolutions that remain (the paper trains with BF16 and TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


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
        model = TinyGroundingGPT.from_pretrained(init, dtype=torch.float32, device=device)
        return model, os.path.join(init, "tokenizer.json"), init
    if cfg.preset == "shapes":
        return new_shapes_model(cfg).to(device), shapes.SHAPES_TOKENIZER, "a new random shapes model"
    model = TinyGroundingGPT.from_components(cfg.clip, cfg.dino, cfg.qwen, image_size=cfg.image_size).to(device)
    return model, os.path.join(cfg.qwen, "tokenizer.json"), f"{cfg.clip} + {cfg.dino} + {cfg.qwen}"


def new_shapes_model(cfg: TrainConfig) -> TinyGroundingGPT:
    return TinyGroundingGPT(shapes_model_config(data.Tokenizer.from_file(shapes.SHAPES_TOKENIZER), cfg))


def shapes_model_config(tok: data.Tokenizer, cfg: TrainConfig) -> TinyGroundingGPTConfig:
    """The tiny model of the shapes world: two 3-layer towers at 112 px (8x8 patches), an LM of cfg's size
    (default 4 blocks of width 128)."""
    tower = dict(
        hidden_size=64, num_layers=3, num_heads=4, mlp_size=256, patch_size=14, image_size=112, feature_layer=-1
    )  # pretrained from scratch (pretrain_towers): the last block's output, no block left idle
    llm = Qwen2Config(
        vocab_size=tok.sampleable_size,
        hidden_size=cfg.llm_width,
        intermediate_size=3 * cfg.llm_width,
        num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads,
        num_key_value_heads=cfg.llm_kv_heads,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=cfg.max_len,
    )
    return TinyGroundingGPTConfig(
        vision=[VisionConfig(kind="clip", **tower), VisionConfig(kind="dinov2", **tower)],
        llm=llm,
        image_token_id=tok.image_pad_id,
        object_token_id=tok.object_pad_id,
        pad_token_id=tok.pad_id,
        stop_token_ids=tok.stop_ids,
        sampleable_size=tok.sampleable_size,
        object_tokens=4,
        train_towers=cfg.train_towers,
    )


def set_trainable(model: TinyGroundingGPT, trains: str, train_towers: bool) -> None:
    """Freeze everything, then unfreeze what the phase trains."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if "llm" in trains:
        model.llm.requires_grad_(True)
    model.encoder.requires_grad_(train_towers)
    model.config.train_towers = train_towers  # the model runs frozen towers under no_grad, in eval mode


def shard(model: TinyGroundingGPT, cfg: TrainConfig) -> None:
    """FSDP2: each transformer block is its own shard group, then the root (torchtitan's recipe)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
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
        lengths: list[int],
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
        if self.steps_per_epoch == 0:
            sys.exit(f"error: the dataset has {len(lengths)} samples, fewer than one global batch ({batch_size})")

    def step_indices(self, step: int) -> list[list[int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        B, mega, within = self.batch_size, *divmod(pos, self.group)
        perm = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + epoch))
        members = perm[mega * self.group * B : min((mega + 1) * self.group, self.steps_per_epoch) * B].tolist()
        members.sort(key=lambda i: self.lengths[i])  # stable: ties keep the permutation's order
        order = torch.randperm(
            len(members) // B,
            generator=torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + mega),
        ).tolist()
        batch = members[order[within] * B : (order[within] + 1) * B]
        per_rank = B // self.world
        mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [mine[i : i + self.micro] for i in range(0, per_rank, self.micro)]

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
        found = super().find_class(module, name) if "." not in name else None
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


def save_checkpoint(model, optimizer, ckpt_dir: str, step: int, rank: int) -> None:
    """Sharded, resumable state (model, optimizer, RNG; the data position is the step itself) and a manifest
    of its files' sha256, each rank hashing what it wrote. The checkpoint before it is deleted only once this
    one is complete, and is kept as the fallback for a damaged one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.path.join(ckpt_dir, f"step-{step:07d}")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    torch.save(
        {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}, os.path.join(path, f"rng-{rank}.pt")
    )
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
    rng = torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=True)  # tensors only: no pickle runs
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
    """6N + 12·L·H·Q·T for the LLM (REFERENCE §7); the towers' forward is small next to it and left out."""
    c = model.config.llm
    params = sum(p.numel() for p in model.llm.parameters())
    return 6 * params + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def peak_flops(device) -> float:
    if device.type != "cuda":
        return 0.0  # MFU is only printed on GPUs
    name = torch.cuda.get_device_name(device)
    return 312e12 if "A100" in name else 989e12


# ----------------------------------------------------------------------------- shapes: tower pretraining


def coordinate_digits(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [..., 4] in [0, 1] -> the tenths and hundredths digits of each coordinate as the LM writes it
    (`0.372` -> 3, 7), each [..., 4]; `1.000` has tenths class 10 ("1.") and hundredths 0."""
    milli = torch.round(boxes * 1000).long()
    whole = milli >= 1000
    tenths = torch.where(whole, torch.full_like(milli, 10), milli // 100)
    return tenths, torch.where(whole, torch.zeros_like(milli), (milli // 10) % 10)


def pretrain_towers(cfg: TrainConfig, rank: int, device) -> None:
    """The shapes world's stand-in for CLIP's and DINOv2's pretraining, so that its stages, like the paper's,
    start from frozen towers whose patch features already say what is where: each tower learns, per patch,
    the class of the object there (colour x shape, or background) and that object's box (and, with
    tower_digits, the digits the box is written with), through a linear head that is thrown away. Without it
    the LM must learn to see and to ground at once, and stalls (README).
    Rank 0 trains (minutes; not checkpointed: a rerun after a crash starts it over); the stages then start from
    the exported `{out_dir}/towers`."""
    out = os.path.join(cfg.out_dir, "towers")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        if rank == 0:
            print(f"towers: already exported to {out}; skipping (delete it to train again)")
        return
    if rank == 0:
        torch.manual_seed(cfg.seed)
        model = new_shapes_model(cfg).to(device)
        towers, grid, batch_size, peak = model.encoder.towers, model.encoder.towers[0].grid, 64, 2e-3
        towers.requires_grad_(True).train()  # the model holds its towers frozen (config.train_towers)
        classes = 1 + len(shapes.CATEGORIES)
        digits = [4 * 11, 4 * 10] if cfg.tower_digits else []  # tenths, hundredths logits of the 4 coordinates
        outputs = [classes, 4, *digits]
        heads = torch.nn.ModuleList(torch.nn.Linear(t.config.hidden_size, sum(outputs)) for t in towers).to(device)
        params = [*towers.parameters(), *heads.parameters()]
        optimizer = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
        dataset = shapes.TowerData(cfg.tower_steps * batch_size, ImageProcessor(model.config.vision), grid, cfg.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=cfg.num_workers)
        targets = "class + box" + (" + digits" if digits else "")
        print(f"towers: {cfg.tower_steps} steps of {batch_size} scenes, per-patch {targets}, lr {peak:g}")
        t_start = time.time()
        for step, batch in enumerate(loader):
            pixels, target_class, target_box = (t.to(device, non_blocking=True) for t in batch)
            lr = lr_at(step, cfg.tower_steps, peak, cfg.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, report, on_object = 0.0, [], target_class > 0  # [B, P]
            digit_targets = coordinate_digits(target_box[on_object]) if digits else ()  # tenths, hundredths [N, 4]
            for t, (tower, head) in enumerate(zip(towers, heads)):
                # [B, P, classes], [B, P, 4], and with digits [B, P, 44], [B, P, 40]
                logits, box, *digit_logits = head(tower(pixels[:, t])).split(outputs, dim=-1)
                class_loss = F.cross_entropy(logits.flatten(0, 1), target_class.flatten())
                box_error = (box[on_object] - target_box[on_object]).abs().mean()  # L1 in units of the side
                # x10: box errors are fractions of the side (~0.5 at init, ~0.02 trained), class losses ~3 -> ~0.1
                loss = loss + class_loss + 10 * box_error
                metrics = {"acc": (logits.argmax(-1) == target_class).float().mean(), "box L1": box_error}
                for name, n, pred, target in zip(("tenths", "hundredths"), (11, 10), digit_logits, digit_targets):
                    pred = pred[on_object].view(-1, n)  # [N * 4, n]
                    loss = loss + F.cross_entropy(pred, target.flatten())
                    metrics[name] = (pred.argmax(-1) == target.flatten()).float().mean()
                report.append((tower.config.kind, metrics))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if step % cfg.log_every == 0 or step + 1 == cfg.tower_steps:
                towers_line = " | ".join(kind + "".join(f" {k} {v:.3f}" for k, v in m.items()) for kind, m in report)
                print(f"towers {step + 1:>6}/{cfg.tower_steps} | loss {loss.item():.4f} | lr {lr:.2e} | {towers_line}",
                      flush=True)
        model.save_pretrained(out, shapes.SHAPES_TOKENIZER)
        print(f"towers: done in {(time.time() - t_start) / 60:.1f} min, exported to {out}")
    barrier()


# ----------------------------------------------------------------------------- one phase


def box_attention_loss(batch: dict, attn: torch.Tensor, tokenizer, image_token_id: int, positions: int = 6):
    """For the rows whose answer starts with a box (REC): -log of the last layer's attention, mean over heads,
    on the image patches whose centres lie inside that box, at the `positions` positions that write the
    answer's first tokens; the mean over those rows (0 without any). attn: [B, heads, L, L]. The answer loss
    alone never taught the shapes LM to look where the question points (README); this says where."""
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
            look = attn[row, :, first - 1 : first - 1 + positions][:, :, patches].float().mean(0)  # [positions, P]
            terms.append(-(look[:, inside].sum(-1) + 1e-4).log().mean())
    return torch.stack(terms).mean() if terms else attn.new_zeros((), dtype=torch.float)


def shapes_stage_data(cfg: TrainConfig, name: str) -> shapes.ShapesStageData:
    """One phase's shapes samples (drawn on the fly). A bad --shapes_* value exits naming the flag."""
    try:
        sizes = dict(zip(PHASES, (int(n) for n in cfg.shapes_samples.split(","))))
        fields = {f.name: f.type for f in dataclasses.fields(shapes.SceneConfig)}
        scene = {k: v for k, v in (item.split("=") for item in cfg.shapes_scene.split(",") if item)}
        if set(scene) - set(fields):
            raise ValueError(f"--shapes_scene takes {', '.join(fields)}; got {cfg.shapes_scene!r}")
        scene = shapes.SceneConfig(**{k: fields[k](v) for k, v in scene.items()})
        kinds = {k: float(v) for k, v in (item.split(":") for item in cfg.shapes_kinds.split(",") if item)}
        return shapes.ShapesStageData(name, sizes[name], seed=cfg.seed, scene=scene, rounds=cfg.shapes_rounds,
                                      kinds=None if name.startswith("stage1") else kinds)
    except ValueError as e:
        sys.exit(f"error: --shapes_samples={cfg.shapes_samples} --shapes_scene={cfg.shapes_scene} "
                 f"--shapes_kinds={cfg.shapes_kinds}: {e}")


def build_dataset(cfg: TrainConfig, samples, model: TinyGroundingGPT, tokenizer) -> data.SFTDataset:
    return data.SFTDataset(
        samples,
        tokenizer,
        model.encoder.processor,
        model.num_image_tokens,
        model.config.object_tokens,
        max_len=cfg.max_len,
        skip_bad=cfg.skip_bad,
        image_after_question=model.config.image_after_question,
    )


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


def train_phase(cfg: TrainConfig, phase: PhaseSettings, rank: int, world: int, device) -> None:
    out = os.path.join(cfg.out_dir, phase.name)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        if rank == 0:
            print(f"{phase.name}: already exported to {out}; skipping (delete it to train again)")
        return
    # the inputs before the model: a wrong path fails in seconds, not after loading billions of weights
    init = start_dir(cfg, phase)
    samples = shapes_stage_data(cfg, phase.name) if cfg.preset == "shapes" else load_phase_samples(cfg, phase, rank)
    torch.manual_seed(cfg.seed)
    model, tokenizer_path, source = build_model(cfg, init, device)
    if rank == 0:
        print(f"{phase.name}: starts from {source}")
    tokenizer = data.Tokenizer.from_file(tokenizer_path)
    # The shapes model starts from random weights, so every phase trains the LLM (and the tiny towers); the
    # paper's projector-only pretraining presumes a pretrained LLM.
    trains = phase.trains if cfg.preset == "paper" else "llm+projector"
    set_trainable(model, trains, cfg.train_towers and cfg.preset == "shapes")
    if model.config.image_after_question != cfg.image_after_question and rank == 0:  # a switch mid-chain: say so
        print(f"{phase.name}: the init model read image_after_question={model.config.image_after_question}; "
              f"this phase trains (and exports) {cfg.image_after_question}")
    model.config.image_after_question = cfg.image_after_question
    llm = model.config.llm
    size = (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads)
    flags = (cfg.llm_width, cfg.llm_layers, cfg.llm_heads, cfg.llm_kv_heads)
    if cfg.preset == "shapes" and size != flags and rank == 0:
        print(f"{phase.name}: the init model's LM (width, blocks, heads, KV heads) is {size}; the --llm_* flags "
              f"size a new model only")
    dataset = build_dataset(cfg, samples, model, tokenizer)
    if cfg.activation_checkpointing:
        model.llm.activation_checkpointing = True
    if cfg.compile:
        for block in model.llm.layers:
            block.compile()
    sharded = dist.is_initialized()
    if sharded:
        shard(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]  # sharding replaced the Parameters
    optimizer = torch.optim.AdamW(trainable, lr=phase.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))

    ckpt_dir = os.path.join(cfg.out_dir, f"{phase.name}-ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    start = 0
    if found := find_checkpoint(ckpt_dir, rank):
        load_checkpoint(model, optimizer, found[0], rank)
        start = found[1]
    steps_per_epoch = len(dataset) // phase.batch_size
    total = math.ceil(phase.epochs * steps_per_epoch)
    total = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
    batches = StepBatches(
        dataset.lengths, phase.batch_size, cfg.micro_batch_size, rank, world, cfg.seed, start, total, cfg.length_group
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=data.collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )
    accumulation = batches.accumulation()
    if rank == 0:
        n_train = sum(p.numel() for p in trainable)
        print(
            f"{phase.name}: {len(dataset)} samples, {total} steps of {phase.batch_size} "
            f"({world} process(es) x {accumulation} micro-batches of {batches.micro}), lr {phase.lr:g}, "
            f"trains {n_train / 1e6:.2f}M params" + (f", resuming at step {start}" if start else "")
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16" and not sharded)
    metrics_path = os.path.join(cfg.out_dir, f"{phase.name}.metrics.jsonl")
    history = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) and start else []
    history = [h for h in history if h["step"] < start]  # a crash may have logged steps after the checkpoint
    peak, fpt = peak_flops(device), None
    micro_iter = iter(loader)
    bar = tqdm(
        total=total,
        initial=start,
        desc=phase.name,
        disable=rank != 0 or not sys.stderr.isatty(),
        dynamic_ncols=True,
        leave=False,
    )
    model.train()
    t_start = time.time()
    for step in range(start, total):
        t0 = time.time()
        micro_batches = [next(micro_iter) for _ in range(accumulation)]
        # The loss is the mean over all answer tokens of the global batch, whatever the split into
        # processes and micro-batches: each micro-batch's mean is reweighted by its share of the tokens
        # (x world size, because FSDP averages gradients over processes).
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches]
        total_tokens = max(1.0, all_reduce_sum(sum(counts), device))
        lr = lr_at(step, total, phase.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, look_sum, n_tokens, n_padded = 0.0, 0.0, 0, 0
        for i, batch in enumerate(micro_batches):
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if sharded:
                model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with autocast:
                if cfg.attention_loss:  # the eager attention path, for its probabilities
                    _, loss, attn = model(**batch, return_last_attn=True)
                    look = box_attention_loss(batch, attn, tokenizer, model.config.image_token_id)
                    look_sum += look.item() / len(micro_batches)
                else:
                    _, loss = model(**batch)
            objective = loss + cfg.attention_loss * look if cfg.attention_loss else loss
            (objective * (counts[i] / total_tokens * world)).backward()
            loss_sum += loss.item() * counts[i]
            n_tokens += int(batch["attention_mask"].sum())
            n_padded += batch["attention_mask"].numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss_value = all_reduce_sum(loss_sum, device) / total_tokens
        tokens = all_reduce_sum(n_tokens, device)
        dt = time.time() - t0
        fpt = fpt or flops_per_token(model, cfg.max_len)
        record = dict(
            step=step,
            loss=round(loss_value, 5),
            lr=lr,
            grad_norm=round(grad_norm, 4),
            tokens_per_s=round(tokens / dt, 1),
            padding=round(1 - n_tokens / max(1, n_padded), 4),  # this process's share of padded positions
            dt=round(dt, 4),
            **({"attention_loss": round(all_reduce_sum(look_sum, device) / world, 4)} if cfg.attention_loss else {}),
        )
        history.append(record)
        bar.update(1)
        if rank == 0 and (step % cfg.log_every == 0 or step == total - 1):
            eta = (time.time() - t_start) / (step + 1 - start) * (total - step - 1)
            mfu = f" | mfu {100 * fpt * tokens / dt / (peak * world):.1f}%" if peak else ""
            mem = f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB" if device.type == "cuda" else ""
            tqdm.write(
                f"{phase.name} {step + 1:>6}/{total} | loss {loss_value:.4f} | lr {lr:.2e} | "
                f"gnorm {grad_norm:.2f} | {tokens / dt:,.0f} tok/s{mfu}{mem} | "
                + (f"attn loss {record['attention_loss']:.3f} | " if cfg.attention_loss else "") +
                f"eta {eta / 60:.1f}min"
            )
            sys.stdout.flush()  # one line per step also when stdout is a file
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == total:
            if rank == 0:  # the metrics first: a checkpoint that exists has its history (resume drops the excess)
                data.atomic_write(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
            save_checkpoint(model, optimizer, ckpt_dir, step + 1, rank)
    bar.close()
    export(model, out, tokenizer_path, rank)
    if rank == 0:
        if not cfg.keep_checkpoints:  # the export is complete and is what the next phase starts from
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        if history:
            draw_loss_curve(
                [h["loss"] for h in history], os.path.join(cfg.out_dir, f"{phase.name}.loss.png"), phase.name
            )
        padding = sum(h.get("padding", 0.0) for h in history) / max(1, len(history))
        print(
            f"{phase.name}: done in {(time.time() - t_start) / 60:.1f} min, exported to {out}; "
            f"{100 * padding:.1f}% of positions were padding; bad input: {data.SKIPPED}"
        )


def main(argv: list[str]) -> None:
    cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    if cfg.preset == "shapes" and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        with open(os.path.join(cfg.out_dir, f"config-stage{cfg.stage}.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    for name in STAGE_PHASES[cfg.stage] if cfg.preset == "shapes" else []:  # bad --shapes_* values stop the
        shapes_stage_data(cfg, name)  # run now, not at the stage they concern
    if cfg.preset == "shapes" and cfg.tower_steps > 0 and cfg.stage in ("1", "all") and not cfg.init:
        pretrain_towers(cfg, rank, device)
    for name in STAGE_PHASES[cfg.stage]:
        train_phase(cfg, resolve_phase(cfg, name), rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
