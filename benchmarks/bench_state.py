"""The synthetic training state of the save/load benchmark: a ksuit model whose weights are a
few large and hundreds of small tensors (about 1 GiB at scale 1), plus an AdamW-like optimizer
state twice that size. Importable as `bench_state` so `ksuit.load_model` can rebuild the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ksuit.models import CompositeModel, Model
from ksuit.schemas.models import ModelBaseConfig

LARGE_COUNT = 8
LARGE_NUMEL = 28 << 20  # 112 MiB of float32 each
SMALL_COUNT = 400
SMALL_NUMEL = 64 << 10  # 256 KiB each


def tensor_sizes(scale: float) -> list[int]:
    """Element counts of every weight tensor at `scale` (1.0: about 1 GiB of float32)."""
    large = [max(16, int(LARGE_NUMEL * scale)) for _ in range(LARGE_COUNT)]
    small = [max(16, int(SMALL_NUMEL * scale * (0.5 + (i % 4) / 4))) for i in range(SMALL_COUNT)]
    # interleave, as real models mix big matrices with biases and norms
    sizes = []
    for i, n in enumerate(small):
        sizes.append(n)
        if i % (SMALL_COUNT // LARGE_COUNT) == 0 and large:
            sizes.append(large.pop())
    return sizes + large


class BenchNetConfig(ModelBaseConfig):
    kind: str = "bench_state.BenchNet"
    name: str = "bench"
    scale: float = 1.0


class BenchNet(Model):
    """Parameters only (no forward): the shapes of `tensor_sizes(scale)`, left uninitialized so
    that building the model for `load_model` costs an allocation, not a random fill."""

    def __init__(self, model_config: BenchNetConfig, **kwargs):
        super().__init__(model_config, **kwargs)
        self.params = nn.ParameterList(nn.Parameter(torch.empty(n)) for n in tensor_sizes(model_config.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never trained
        return x


def build_model(scale: float) -> BenchNet:
    """A `BenchNet` with random weights and a filled AdamW state (exp_avg, exp_avg_sq, step)."""
    config = BenchNetConfig(scale=scale, optimizer_config={"kind": "torch.optim.AdamW", "lr": 1e-3})
    model = BenchNet(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1, generator=generator)
    model.initialize()
    optim = model.optimizer.torch_optim
    for p in model.parameters():  # the state AdamW.step() would create, without a 1 GiB grad
        optim.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.empty_like(p).uniform_(-1, 1, generator=generator),
            "exp_avg_sq": torch.empty_like(p).uniform_(0, 1, generator=generator),
        }
    return model


def state_nbytes(model: BenchNet) -> tuple[int, int]:
    """`(weights bytes, optimizer state bytes)`."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optim = sum(
        t.numel() * t.element_size()
        for s in model.optimizer.torch_optim.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return weights, optim


# ---- the states of the issue-14 goals -------------------------------------------------------------

MANY_SMALL_COUNT = 5000
MANY_SMALL_NUMEL = 16 << 10  # 64 KiB of float32 each
SUBMODELS = 20
SUBMODEL_WIDTH = 64  # a 64x64 linear layer: 16.6 KB of weights, twice that of AdamW state


class ManySmallNetConfig(ModelBaseConfig):
    kind: str = "bench_state.ManySmallNet"
    name: str = "many"
    count: int = MANY_SMALL_COUNT


class ManySmallNet(Model):
    """`count` parameters of 64 KiB each, no optimizer: a state of many small tensors."""

    def __init__(self, model_config: ManySmallNetConfig, **kwargs):
        super().__init__(model_config, **kwargs)
        self.params = nn.ParameterList(
            nn.Parameter(torch.full((MANY_SMALL_NUMEL,), float(i % 7))) for i in range(model_config.count)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never trained
        return x


def build_many_small(count: int = MANY_SMALL_COUNT) -> ManySmallNet:
    return ManySmallNet(ManySmallNetConfig(count=count)).initialize()


class SmallLeafConfig(ModelBaseConfig):
    kind: str = "bench_state.SmallLeaf"
    width: int = SUBMODEL_WIDTH


class SmallLeaf(Model):
    def __init__(self, model_config: SmallLeafConfig, **kwargs):
        super().__init__(model_config, **kwargs)
        self.linear = nn.Linear(model_config.width, model_config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never trained
        return self.linear(x)


class ManyLeavesNet(CompositeModel):
    """A composite of `SUBMODELS` small leaves, each with an AdamW state: its `latest` with the
    trainer state is 41 small files."""

    def __init__(self, model_config: ModelBaseConfig, **kwargs):
        super().__init__(model_config, **kwargs)
        adamw = {"kind": "torch.optim.AdamW", "lr": 1e-3}
        self.leaves = nn.ModuleDict(
            {
                f"part{i}": SmallLeaf(SmallLeafConfig(name=f"part{i}", optimizer_config=adamw))
                for i in range(SUBMODELS)
            }
        )

    @property
    def submodels(self) -> dict:
        return dict(self.leaves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never trained
        return x


def build_many_leaves() -> ManyLeavesNet:
    """The composite with its AdamW state filled as one step would fill it."""
    model = ManyLeavesNet(ModelBaseConfig(kind="bench_state.ManyLeavesNet", name="net")).initialize()
    for _, leaf in model.iter_leaves():
        optim = leaf.optimizer.torch_optim
        for p in leaf.parameters():
            optim.state[p] = {
                "step": torch.tensor(1.0),
                "exp_avg": torch.randn_like(p),
                "exp_avg_sq": torch.rand_like(p),
            }
    return model


def trainer_state() -> dict:
    """What a trainer file holds, roughly: counters, callback states and RNG states."""
    return {
        "training_iteration": {"epoch": 1, "update": 10, "sample": 80},
        "callback_state_dicts": {"checkpoint": {}},
        "rng": {"torch": torch.get_rng_state(), "seed": torch.tensor(0)},
    }
