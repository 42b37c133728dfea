"""The training loop shared by detectors that learn a network: shuffled mini-batches, a progress bar
with the loss, early stopping on the loss of held-out normal images, the best epoch's weights kept."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class TrainingHistory:
    """What happened while training: losses per epoch, which epoch was kept and why training ended."""

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped: str = "all_epochs"  # "all_epochs", "early_stopping" or "time_limit"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "train_loss": [round(x, 6) for x in self.train_loss],
            "validation_loss": [round(x, 6) for x in self.validation_loss],
            "best_epoch": self.best_epoch,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 2),
        }


def train_network(
    network: nn.Module,
    train_step: Callable[[torch.Tensor], float],
    validation_loss: Callable[[torch.Tensor], float],
    train_data: torch.Tensor,
    validation_data: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    patience: int,
    device: torch.device,
    seed: int,
    max_seconds: float | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainingHistory:
    """Train ``network`` with ``train_step`` (one optimisation step on a batch, returns its mean loss).

    After each epoch the mean ``validation_loss`` over ``validation_data`` decides: the best epoch's
    weights are kept, and training stops after ``patience`` epochs without improvement (0 disables
    early stopping) or when ``max_seconds`` have passed. Data lives on the CPU; batches move to
    ``device`` as they are used, so the cache may be larger than GPU memory."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if len(train_data) == 0 or len(validation_data) == 0:
        raise ValueError("training needs at least one training and one validation sample")
    generator = torch.Generator().manual_seed(seed)
    history = TrainingHistory()
    best_loss, best_state, waited = math.inf, None, 0
    start = time.perf_counter()
    n_batches = math.ceil(len(train_data) / batch_size)
    with tqdm(total=epochs * n_batches, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        for epoch in range(epochs):
            network.train()
            order = torch.randperm(len(train_data), generator=generator)
            total, seen = 0.0, 0
            for first in range(0, len(order), batch_size):
                rows = order[first : first + batch_size]
                if len(rows) < 2 and seen:  # a 1-sample batch breaks batch norm; its data recurs next epoch
                    bar.update(1)
                    continue
                loss = train_step(train_data[rows].to(device, torch.float32, non_blocking=True))
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch + 1} (loss {loss}); lower learning_rate"
                    )
                total, seen = total + loss * len(rows), seen + len(rows)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{total / seen:.4f}", refresh=False)
            history.train_loss.append(total / seen)
            history.validation_loss.append(
                _mean_loss(network, validation_loss, validation_data, batch_size, device)
            )
            bar.set_postfix(
                epoch=f"{epoch + 1}/{epochs}",
                loss=f"{history.train_loss[-1]:.4f}",
                val=f"{history.validation_loss[-1]:.4f}",
            )
            if history.validation_loss[-1] < best_loss:
                best_loss, waited, history.best_epoch = history.validation_loss[-1], 0, epoch
                best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            else:
                waited += 1
            if patience and waited >= patience:
                history.stopped = "early_stopping"
                break
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                history.stopped = "time_limit"
                break
    network.load_state_dict(best_state)
    network.eval()
    history.seconds = time.perf_counter() - start
    return history


def _mean_loss(
    network: nn.Module,
    validation_loss: Callable[[torch.Tensor], float],
    data: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> float:
    network.eval()
    total = 0.0
    with torch.no_grad():
        for first in range(0, len(data), batch_size):
            batch = data[first : first + batch_size].to(device, torch.float32)
            total += validation_loss(batch) * len(batch)
    return total / len(data)
