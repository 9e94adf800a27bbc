"""TopK sparse autoencoders on residual-stream activations (chapter 5).

:class:`TopKSAE` follows Gao et al. (2024): a pre-encoder bias ``b_pre`` is
subtracted before encoding and added back after decoding, the encoder keeps the
``k`` largest pre-activations of every token (ReLU on those), and the decoder rows
have unit norm (renormalised after every step, with the gradient component
parallel to each row removed before it). The decoder starts as the encoder's
transpose. Inputs are scaled so that their mean squared norm is ``d_in``; the
scale is stored in the SAE, so ``encode``/``decode`` take and give activations in
the model's own units.

:func:`train_sae` trains one with Adam on MSE plus the AuxK loss that revives dead
latents; :func:`cached_sae` trains once and reloads from the content-keyed cache;
:func:`sae_metrics` and :func:`loss_recovered` say how good the SAE is.

References:
    L. Gao, T. Dupré la Tour, H. Tillman, G. Goh, R. Troll, A. Radford,
    I. Sutskever, J. Leike, J. Wu (2024), Scaling and evaluating sparse
    autoencoders, arXiv:2406.04093.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.cache import atomic_path, cached, sha256_file
from ..core.device import chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.progress import tqdm
from .distributed import all_reduce_sum, barrier, broadcast_module, is_main, rank_and_world
from .models import block_output_hook, transformer_blocks

__all__ = [
    "SAEHistory",
    "TopKSAE",
    "cached_loss_recovered",
    "cached_sae",
    "encode_all",
    "load_sae",
    "loss_recovered",
    "sae_metrics",
    "save_sae",
    "train_sae",
]


#: Version of the folder layout :func:`save_sae` writes.
SAE_FORMAT = 1

ArrayLike = np.ndarray | torch.Tensor | str | Path


class TopKSAE(torch.nn.Module):
    """TopK sparse autoencoder (chapter 5).

    Args:
        d_in: width of the activations.
        n_latents: number of latents (dictionary size).
        k: active latents per token.
        seed: seed of the initialisation.

    Attributes:
        W_enc: ``(d_in, n_latents)`` encoder.
        b_enc: ``(n_latents,)`` encoder bias.
        W_dec: ``(n_latents, d_in)`` decoder, unit-norm rows.
        b_pre: ``(d_in,)`` pre-encoder bias (in scaled units).
        input_scale: scalar buffer; activations are multiplied by it before encoding.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("n_latents", n_latents), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EmbgeoInputError(f"{name} must be a positive integer, got {value!r}.")
        if k > n_latents:
            raise EmbgeoInputError(f"k = {k} active latents cannot exceed n_latents = {n_latents}; lower k.")
        self.d_in, self.n_latents, self.k = int(d_in), int(n_latents), int(k)
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(d_in)
        w = (torch.rand((n_latents, d_in), generator=gen) * 2 - 1) * bound
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w.clone())
        self.W_enc = torch.nn.Parameter(w.T.clone().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_latents))
        self.b_pre = torch.nn.Parameter(torch.zeros(d_in))
        self.input_scale: torch.Tensor
        self.register_buffer("input_scale", torch.ones(()))

    def config(self) -> dict[str, int]:
        return {"d_in": self.d_in, "n_latents": self.n_latents, "k": self.k}

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of raw activations ``x`` ``(n, d_in)``."""
        xs = x.to(self.W_enc.dtype) * self.input_scale
        return (xs - self.b_pre) @ self.W_enc + self.b_enc

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (ReLU'd) and indices of the ``k`` active latents of every row."""
        values, indices = torch.topk(self.pre_activations(x), self.k, dim=-1, sorted=False)
        return torch.relu(values), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``(n, n_latents)`` with at most ``k`` non-zeros per row."""
        values, indices = self.topk(x)
        return torch.zeros((x.shape[0], self.n_latents), dtype=values.dtype, device=values.device).scatter_(
            1, indices, values
        )

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction in scaled units from the active latents (an embedding bag: ``k`` rows per token)."""
        out = torch.nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return out + self.b_pre

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Activations in the model's units from dense latents ``(n, n_latents)``."""
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_pre) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, z)``: reconstruction in the model's units and dense latents."""
        z = self.encode(x)
        return self.decode(z), z

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient that would change its norm."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(dim=1, keepdim=True) * w)


@dataclass
class SAEHistory:
    """Training record of :func:`train_sae` (chapter 5): per-epoch losses and dead fractions."""

    epochs: list[int] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    from_cache: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def add_epoch(self, epoch: int, sums: dict[str, float], n_tokens: int, dead_fraction: float) -> None:
        """Record one epoch from its running sums (squared errors, AuxK loss, variance) over ``n_tokens`` tokens."""
        self.epochs.append(epoch)
        self.mse.append(sums["mse"] / n_tokens)
        self.aux.append(sums["aux"] / n_tokens)
        self.fvu.append(sums["err"] / max(sums["var"], 1e-30))
        self.dead_fraction.append(dead_fraction)


class ActivationSource:
    """Rows of an activation matrix held in memory or read from a ``.npy`` file in batches (chapter 5)."""

    def __init__(self, x: ArrayLike, dev: torch.device, memory_budget: int) -> None:
        if isinstance(x, (str, Path)):
            path = Path(x)
            if not path.exists():
                raise EmbgeoInputError(f"Activation file {path} does not exist.")
            x = np.load(path, mmap_mode="r")
        if isinstance(x, torch.Tensor):
            data: np.ndarray | torch.Tensor = x.detach()
        else:
            data = np.asarray(x) if not isinstance(x, np.memmap) else x
        if data.ndim != 2:
            raise EmbgeoInputError(f"Activations must be 2-D (tokens x width), got shape {tuple(data.shape)}.")
        if data.shape[0] < 2:
            raise EmbgeoInputError(f"Need at least 2 tokens to train an SAE, got {data.shape[0]}.")
        self.n, self.d = int(data.shape[0]), int(data.shape[1])
        nbytes = self.n * self.d * 4
        self.dev = dev
        self.data: Any
        self.on_disk = isinstance(data, np.memmap) and nbytes > memory_budget
        if self.on_disk:
            self.data = data
        else:
            self.data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
            self.data = self.data.to(device=dev, dtype=torch.float32)
        self._check_finite()

    def _check_finite(self) -> None:
        for rows in self.chunks(1 << 14):
            if not bool(torch.isfinite(rows).all()):
                raise EmbgeoInputError(
                    "Activations hold NaN or infinite values; check the model (a damaged weight file?) and re-extract."
                )

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """The rows at ``index`` as float32 on the device."""
        if self.on_disk:
            order = np.sort(index)
            return torch.from_numpy(np.ascontiguousarray(self.data[order], dtype=np.float32)).to(self.dev)
        return self.data[torch.as_tensor(index, device=self.dev)]

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive blocks of at most ``size`` rows."""
        for start in range(0, self.n, size):
            stop = min(self.n, start + size)
            if self.on_disk:
                yield torch.from_numpy(np.ascontiguousarray(self.data[start:stop], dtype=np.float32)).to(self.dev)
            else:
                yield self.data[start:stop]

    def moments(self) -> tuple[torch.Tensor, float]:
        """Mean vector and mean squared norm of the rows (float64 accumulation)."""
        total = torch.zeros(self.d, dtype=torch.float64, device=self.dev)
        sq = 0.0
        for rows in self.chunks(1 << 14):
            total += rows.double().sum(dim=0)
            sq += float((rows.double() ** 2).sum())
        return (total / self.n).float(), sq / self.n


class LocalTraining:
    """How :func:`train_sae` trains in one process: a world of one (chapter 5).

    The trainer asks its strategy for everything that depends on how the batch is split: which rows this
    process takes, the loss normalisers, and the sums over processes. :class:`DataParallelTraining` answers
    the same questions over a ``torch.distributed`` process group.
    """

    rank, world = 0, 1

    def moments(self, source: ActivationSource) -> tuple[torch.Tensor, float]:
        return source.moments()

    def my_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def mse(self, err: torch.Tensor, n_global: int) -> torch.Tensor:
        return err.pow(2).sum(dim=1).mean()

    def fired(self, fired: torch.Tensor) -> torch.Tensor:
        return fired

    def aux_loss(self, e_hat: torch.Tensor, target: torch.Tensor, n_global: int) -> torch.Tensor:
        denom = (target - target.mean(dim=0)).pow(2).sum(dim=1).mean().clamp_min(1e-12)
        return (e_hat - target).pow(2).sum(dim=1).mean() / denom

    def rows_counted(self, batch: torch.Tensor, n_global: int) -> int:
        return batch.shape[0]

    def share_module(self, sae: TopKSAE) -> None:
        pass

    def reduce_gradients(self, sae: TopKSAE) -> None:
        pass

    def reduce_sums(self, sums: dict[str, float], dev: torch.device) -> None:
        pass


class DataParallelTraining(LocalTraining):
    """:func:`train_sae` over a ``torch.distributed`` process group (chapter 5).

    Rank ``r`` takes rows ``r::world`` of every global batch; losses are divided by the global batch size,
    gradients and running sums are summed over ranks, and the input moments, dead-latent counters and the
    AuxK normaliser are global.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def moments(self, source: ActivationSource) -> tuple[torch.Tensor, float]:
        total = torch.zeros(source.d, dtype=torch.float64, device=source.dev)
        sq = torch.zeros((), dtype=torch.float64, device=source.dev)
        for start, rows in zip(range(0, source.n, 1 << 14), source.chunks(1 << 14), strict=True):
            mine = rows[(self.rank - start) % self.world :: self.world].double()
            total += mine.sum(dim=0)
            sq += (mine**2).sum()
        all_reduce_sum(total)
        all_reduce_sum(sq)
        return (total / source.n).float(), float(sq) / source.n

    def my_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows[self.rank :: self.world]

    def mse(self, err: torch.Tensor, n_global: int) -> torch.Tensor:
        return err.pow(2).sum() / n_global

    def fired(self, fired: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(fired.to(torch.int32)) > 0

    def aux_loss(self, e_hat: torch.Tensor, target: torch.Tensor, n_global: int) -> torch.Tensor:
        mean = all_reduce_sum(target.sum(dim=0)) / n_global
        denom = (all_reduce_sum((target - mean).pow(2).sum()) / n_global).clamp_min(1e-12)
        return (e_hat - target).pow(2).sum() / n_global / denom

    def rows_counted(self, batch: torch.Tensor, n_global: int) -> int:
        return n_global

    def share_module(self, sae: TopKSAE) -> None:
        broadcast_module(sae)

    def reduce_gradients(self, sae: TopKSAE) -> None:
        for param in sae.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            all_reduce_sum(param.grad)

    def reduce_sums(self, sums: dict[str, float], dev: torch.device) -> None:
        names = sorted(sums)
        totals = all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64, device=dev))
        for name, value in zip(names, totals.tolist(), strict=True):
            sums[name] = value


def training_strategy(distributed: bool | None) -> LocalTraining:
    """The strategy :func:`train_sae` uses: the process group's when one is initialised and wanted (chapter 5)."""
    rank, world = rank_and_world()
    if distributed and world == 1 and not torch.distributed.is_initialized():
        raise EmbgeoInputError(
            "distributed=True but no process group is initialised: start with torchrun and call "
            "embgeo_utils.lm.distributed.init_from_env() first."
        )
    return DataParallelTraining(rank, world) if world > 1 and distributed is not False else LocalTraining()


@dataclass
class _Settings:
    """The optimisation settings of one :func:`train_sae` call, resolved."""

    k: int
    batch_size: int
    aux_k: int
    aux_coef: float
    dead_after: int


def _initial_sae(
    source: ActivationSource, n_latents: int, k: int, seed: int, strategy: LocalTraining
) -> tuple[TopKSAE, torch.Tensor]:
    """A new SAE whose input scale and pre-encoder bias come from the activations' moments, and their mean."""
    sae = TopKSAE(source.d, n_latents, k, seed=seed).to(source.dev)
    strategy.share_module(sae)
    mean, mean_sq = strategy.moments(source)
    if mean_sq <= 0:
        raise EmbgeoInputError("All activations are zero; nothing to learn.")
    scale = math.sqrt(source.d / mean_sq)
    with torch.no_grad():
        sae.input_scale.fill_(scale)
        sae.b_pre.copy_(mean * scale)
    return sae, mean


class _SparseGradProduct(torch.autograd.Function):
    """``x @ w`` for data ``x`` (no gradient) whose weight gradient uses the sparsity of the output's gradient.

    Chapter 5's SAEs keep ``k`` of ``n_latents`` pre-activations per token (plus the AuxK latents), so the gradient
    of ``x @ w`` is mostly zeros; ``x^T g`` is then computed as a sparse (CSR) product, about half the cost of the
    dense one on a CPU; a dense gradient falls back to the dense product. The result is the same up to float rounding.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x @ w

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        import warnings

        (x,) = ctx.saved_tensors
        if grad.device.type != "cpu" or float((grad != 0).float().mean()) > 0.1:
            return None, x.T @ grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # sparse CSR support is labelled beta
            return None, (grad.T.to_sparse_csr() @ x).T


def _step(
    sae: TopKSAE, batch: torch.Tensor, n_global: int, since_fired: torch.Tensor, s: _Settings, strategy: LocalTraining
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of one batch: MSE in scaled units plus the AuxK loss on the dead latents; updates ``since_fired``."""
    xs = batch * sae.input_scale
    # (xs - b_pre) W + b_enc, written so that no gradient is formed for the data: the weight gradient comes from the
    # sparse gradient of the pre-activations (_SparseGradProduct) and b_pre's from one vector-matrix product.
    pre = _SparseGradProduct.apply(xs, sae.W_enc) - sae.b_pre @ sae.W_enc + sae.b_enc
    values, indices = torch.topk(pre, s.k, dim=1, sorted=False)
    values = torch.relu(values)
    err = xs - sae.decode_sparse(values, indices)
    mse = strategy.mse(err, n_global)
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=batch.device)
    fired[indices[values > 0]] = True
    since_fired += n_global
    since_fired[strategy.fired(fired)] = 0
    dead = since_fired >= s.dead_after
    aux = torch.zeros((), device=batch.device)
    if bool(dead.any()):
        masked = pre.masked_fill(~dead[None, :], float("-inf"))
        a_vals, a_idx = torch.topk(masked, min(s.aux_k, int(dead.sum())), dim=1, sorted=False)
        e_hat = torch.nn.functional.embedding_bag(a_idx, sae.W_dec, per_sample_weights=torch.relu(a_vals), mode="sum")
        aux = torch.nan_to_num(strategy.aux_loss(e_hat, err.detach(), n_global), nan=0.0)
    return mse, aux, err, xs


def _epoch(
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    source: ActivationSource,
    order: np.ndarray,
    since_fired: torch.Tensor,
    mean: torch.Tensor,
    s: _Settings,
    strategy: LocalTraining,
    bar: Any,
) -> dict[str, float]:
    """One pass over the shuffled rows; returns the epoch's running sums (summed over processes)."""
    sums = {"mse": 0.0, "aux": 0.0, "err": 0.0, "var": 0.0}
    for start in range(0, source.n, s.batch_size):
        rows = order[start : start + s.batch_size]
        batch = source.rows(strategy.my_rows(rows))
        mse, aux, err, xs = _step(sae, batch, len(rows), since_fired, s, strategy)
        opt.zero_grad(set_to_none=True)
        (mse + s.aux_coef * aux).backward()
        strategy.reduce_gradients(sae)
        sae.remove_parallel_gradient()
        opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            counted = strategy.rows_counted(batch, len(rows))
            sums["mse"] += float(mse) * counted
            sums["aux"] += float(aux) * counted
            sums["err"] += float(err.pow(2).sum())
            sums["var"] += float((xs - sae.input_scale * mean).pow(2).sum())
        bar.update(1)
    strategy.reduce_sums(sums, source.dev)
    return sums


def _check_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise EmbgeoInputError(f"{name} must be a positive integer, got {value!r}.")


def train_sae(
    x: ArrayLike,
    n_latents: int,
    k: int,
    *,
    epochs: int = 4,
    batch_size: int = 256,
    lr: float | None = None,
    aux_k: int | None = None,
    aux_coef: float = 1 / 32,
    dead_tokens: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    memory_budget: int = 1 << 30,
    progress: bool = True,
    distributed: bool | None = None,
) -> tuple[TopKSAE, SAEHistory]:
    """Train a :class:`TopKSAE` on activations ``x`` ``(tokens, d_in)`` (chapter 5).

    Adam on the mean squared error in scaled units plus ``aux_coef`` times the
    AuxK loss: the residual ``x - x_hat`` is reconstructed from the ``aux_k``
    largest pre-activations among the dead latents (those that did not fire in
    the last ``dead_tokens`` tokens), normalised by the residual's variance.
    The activations come through an :class:`ActivationSource`; the split of
    every batch over processes through a strategy (:func:`training_strategy`;
    one process is :class:`LocalTraining`: the same trainer with a world of one).

    Args:
        x: activations as an array, tensor, or path to a ``.npy`` file; a file
            larger than ``memory_budget`` bytes is read in batches from disk.
        n_latents: dictionary size; k: active latents per token.
        epochs: passes over the tokens (shuffled with ``seed`` each epoch).
        batch_size: tokens per step.
        lr: Adam learning rate (default ``2e-4 / sqrt(n_latents / 2**14)``, Gao et al.'s scaling).
        aux_k: latents of the AuxK reconstruction (default ``d_in // 2``).
        aux_coef: weight of the AuxK loss.
        dead_tokens: a latent is dead after this many tokens without firing (default: half an epoch).
        seed: seed of the initialisation and of the batch order (the same seed gives the same weights on the CPU).
        device: where to train; memory_budget: bytes of activations kept in memory; progress: show a bar (rank 0).
        distributed: train data-parallel over the initialised ``torch.distributed`` process group (default: whenever
            one is initialised; ``False`` trains alone; every rank passes the same ``x``). The batch order is that of
            a one-process run with this seed, and the result equals it up to the order of float sums (measured on
            the CPU: 3e-7 relative on synthetic data, 3e-5 on SmolLM2 hidden states); see
            :class:`DataParallelTraining`. On GPUs pass this rank's device
            (:func:`embgeo_utils.lm.distributed.init_from_env`).

    Returns:
        ``(sae, history)``; the SAE is in eval mode on ``device``, identical on every rank.

    Raises:
        EmbgeoInputError: on NaN/inf activations, ``k > n_latents`` or bad arguments.
    """
    import time

    strategy = training_strategy(distributed)
    source = ActivationSource(x, get_device(device), memory_budget)
    _check_counts(epochs=epochs, batch_size=batch_size)
    sae, mean = _initial_sae(source, n_latents, k, seed, strategy)
    dead_after = max(batch_size, source.n // 2) if dead_tokens is None else int(dead_tokens)
    aux_k = min(n_latents, source.d // 2 if aux_k is None else int(aux_k))
    settings = _Settings(k, batch_size, aux_k, aux_coef, dead_after)
    lr = 2e-4 / math.sqrt(n_latents / 2**14) if lr is None else float(lr)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=source.dev.type == "cpu")
    rng = np.random.default_rng(seed)
    since_fired = torch.zeros(n_latents, dtype=torch.long, device=source.dev)
    history, start_time = SAEHistory(), time.perf_counter()
    steps = epochs * math.ceil(source.n / batch_size)
    quiet = not progress or strategy.rank > 0
    bar = tqdm(total=steps, desc=f"SAE {n_latents}x k={k}", unit="step", disable=quiet, mininterval=2.0)
    sae.train()
    for epoch in range(epochs):
        sums = _epoch(sae, opt, source, rng.permutation(source.n), since_fired, mean, settings, strategy, bar)
        history.add_epoch(epoch + 1, sums, source.n, float((since_fired >= dead_after).float().mean()))
        bar.set_postfix(fvu=f"{history.fvu[-1]:.3f}", dead=f"{history.dead_fraction[-1]:.2f}")
    bar.close()
    strategy.share_module(sae)  # the weights already agree; this makes them bit-identical whatever the backend did
    sae.eval()
    history.tokens, history.seconds = source.n, time.perf_counter() - start_time
    return sae, history


def save_sae(sae: TopKSAE, folder: str | Path, history: SAEHistory | None = None, meta: dict | None = None) -> Path:
    """Write ``sae.safetensors`` and ``config.json`` (with the weights' sha256) atomically (chapter 5)."""
    from safetensors.torch import save_file

    target = Path(folder)
    with atomic_path(target) as staged:
        staged.mkdir(parents=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        save_file(tensors, str(staged / "sae.safetensors"))
        config = {
            "version": SAE_FORMAT,
            **sae.config(),
            "sha256": sha256_file(staged / "sae.safetensors"),
            "history": history.as_dict() if history else None,
            "meta": meta or {},
        }
        (staged / "config.json").write_text(json.dumps(config, indent=1, default=str))
    return target


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[TopKSAE, SAEHistory | None]:
    """Read an SAE written by :func:`save_sae`, checking its sha256 (chapter 5).

    Raises:
        EmbgeoInputError: if the folder is missing, unreadable or its weights do not match their checksum.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        weights = folder / "sae.safetensors"
        if sha256_file(weights) != config["sha256"]:
            raise EmbgeoInputError(f"{weights} does not match its checksum; delete {folder} to retrain.")
        sae = TopKSAE(config["d_in"], config["n_latents"], config["k"])
        sae.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, EmbgeoInputError):
            raise
        raise EmbgeoInputError(f"SAE folder {folder} is unreadable ({exc}); delete it to retrain.") from exc
    hist = config.get("history")
    history = SAEHistory(**{k: v for k, v in hist.items() if k in SAEHistory.__dataclass_fields__}) if hist else None
    return sae.to(get_device(device)).eval(), history


def cached_sae(
    x: ArrayLike,
    n_latents: int,
    k: int,
    key: dict[str, Any],
    *,
    device: str | torch.device = "auto",
    **train_kwargs: Any,
) -> tuple[TopKSAE, SAEHistory]:
    """Train an SAE once and reuse it (chapter 5).

    The cache entry (:func:`embgeo_utils.core.cache.cached`, kind ``sae``) is named by ``key`` (model digest, layer,
    token-set digest: what determines ``x``) and every hyperparameter. A rerun loads it; a damaged entry is
    retrained with a one-line notice. Under ``torchrun`` every rank trains its shard and rank 0 writes the entry.
    """
    hyper = {"n_latents": n_latents, "k": k, **{name: train_kwargs.get(name) for name in sorted(train_kwargs)}}
    hyper.pop("progress", None)
    hyper.pop("distributed", None)  # a data-parallel run trains the same SAE
    found = _sae_entry.peek(x, key, hyper, device, train_kwargs)
    if found is not None:
        sae, history = _from_entry(found, device)
        history.from_cache = True
        return sae, history
    if training_strategy(train_kwargs.get("distributed")).world == 1:
        return _from_entry(_sae_entry(x, key, hyper, device, train_kwargs), device)
    sae, history = train_sae(x, n_latents, k, device=device, **train_kwargs)
    if is_main():
        _sae_entry.put(_as_entry(sae, history), x, key, hyper, device, train_kwargs)
    barrier()
    return sae, history


@cached("sae", version=2, ignore=("x", "device", "train_kwargs"))
def _sae_entry(
    x: ArrayLike, key: dict[str, Any], hyper: dict[str, Any], device: str | torch.device, train_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A trained SAE as a cache entry: its weights, configuration and training history."""
    sae, history = train_sae(x, hyper["n_latents"], hyper["k"], device=device, **train_kwargs)
    return _as_entry(sae, history)


def _as_entry(sae: TopKSAE, history: SAEHistory) -> dict[str, Any]:
    state = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    return {"state": state, "config": sae.config(), "history": history.as_dict()}


def _from_entry(entry: dict[str, Any], device: str | torch.device) -> tuple[TopKSAE, SAEHistory]:
    config = entry["config"]
    sae = TopKSAE(config["d_in"], config["n_latents"], config["k"])
    sae.load_state_dict(entry["state"])
    fields = SAEHistory.__dataclass_fields__
    history = SAEHistory(**{k: v for k, v in entry["history"].items() if k in fields})
    return sae.to(get_device(device)).eval(), history


@torch.no_grad()
def encode_all(sae: TopKSAE, x: ArrayLike, chunk_size: int | None = None) -> torch.Tensor:
    """Dense latents of every row of ``x`` (chapter 5), computed in chunks on the SAE's device."""
    dev = sae.W_enc.device
    source = ActivationSource(x, dev, 1 << 62)
    step = chunk_rows(8 * sae.n_latents, dev, chunk_size)
    return torch.cat([sae.encode(rows) for rows in source.chunks(step)])


@torch.no_grad()
def sae_metrics(sae: TopKSAE, x: ArrayLike, chunk_size: int | None = None) -> dict[str, float]:
    """Quality of an SAE on activations ``x`` (chapter 5), usually held-out tokens.

    Returns:
        ``fvu`` (fraction of variance unexplained: squared error over squared
        deviation from the mean), ``l0`` (mean active latents per token),
        ``dead_fraction`` (latents never active on these tokens), ``n_tokens``.
    """
    dev = sae.W_enc.device
    source = ActivationSource(x, dev, 1 << 62)
    mean, _ = source.moments()
    step = chunk_rows(8 * sae.n_latents, dev, chunk_size)
    err = var = 0.0
    active = 0
    ever = torch.zeros(sae.n_latents, dtype=torch.bool, device=dev)
    for rows in source.chunks(step):
        x_hat, z = sae(rows)
        err += float((rows - x_hat).double().pow(2).sum())
        var += float((rows - mean).double().pow(2).sum())
        nz = z > 0
        active += int(nz.sum())
        ever |= nz.any(dim=0)
    return {
        "fvu": err / max(var, 1e-30),
        "l0": active / source.n,
        "dead_fraction": float((~ever).float().mean()),
        "n_tokens": float(source.n),
    }


@torch.no_grad()
def loss_recovered(
    loaded: Any,
    ids: np.ndarray,
    layer: int,
    sae: TopKSAE,
    mean_activation: torch.Tensor | np.ndarray,
    skip_first: int = 1,
    batch_size: int = 2,
    clean: float | None = None,
) -> dict[str, float]:
    """Next-token loss with the SAE's reconstruction spliced in at block ``layer`` (chapter 5).

    The output of block ``layer`` (1-based, as in the hidden states) is replaced by
    its reconstruction at every position from ``skip_first`` on (the first
    position carries outsized activations in these models and is not what the SAE
    was trained on); the same positions are replaced by the mean activation for
    the ablation baseline. The loss is the mean next-token cross-entropy over the
    predictions made from those positions.

    ``clean`` is the unmodified loss on the same ``ids`` when already known (it
    does not depend on the layer or the SAE), which saves one forward pass.

    Returns:
        ``clean``, ``spliced``, ``ablated`` losses (nats) and ``recovered`` =
        ``(ablated - spliced) / (ablated - clean)``.
    """

    blocks = transformer_blocks(loaded.model)
    if not 1 <= layer <= len(blocks):
        raise EmbgeoInputError(f"layer must lie in [1, {len(blocks)}] for {loaded.info.name}, got {layer}.")
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] <= skip_first + 1:
        raise EmbgeoInputError(f"ids must be (prompts, tokens) with more than {skip_first + 1} tokens.")
    dev = loaded.device
    mean_vec = torch.as_tensor(mean_activation, dtype=torch.float32, device=dev)
    block = blocks[layer - 1]

    def splice(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        flat = h[:, skip_first:].reshape(-1, h.shape[-1]).float()
        out[:, skip_first:] = sae.decode(sae.encode(flat)).reshape(h.shape[0], -1, h.shape[-1]).to(h.dtype)
        return out

    def ablate(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, skip_first:] = mean_vec.to(h.dtype)
        return out

    def run(fn: Any | None) -> float:
        total, count = 0.0, 0
        for start in range(0, len(arr), batch_size):
            batch = torch.as_tensor(arr[start : start + batch_size], device=dev)
            if fn is None:
                logits = loaded.model(input_ids=batch).logits
            else:
                with block_output_hook(block, fn):
                    logits = loaded.model(input_ids=batch).logits
            pred = logits[:, skip_first:-1].float()
            target = batch[:, skip_first + 1 :]
            ce = torch.nn.functional.cross_entropy(
                pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(ce)
            count += target.numel()
        return total / count

    clean = run(None) if clean is None else float(clean)
    spliced, ablated = run(splice), run(ablate)
    gap = ablated - clean
    return {
        "clean": clean,
        "spliced": spliced,
        "ablated": ablated,
        "recovered": (ablated - spliced) / gap if gap > 0 else float("nan"),
    }


#: :func:`loss_recovered`, cached under the model, tokens, layer, SAE weights and mean (chapter 5): a rerun with the
#: same inputs reads the numbers instead of running the model three times; ``clean`` and ``batch_size`` cannot
#: change them and are left out of the key.
cached_loss_recovered = cached("sae_loss", version=1, ignore=("clean", "batch_size"))(loss_recovered)
