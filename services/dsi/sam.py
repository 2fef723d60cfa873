"""Sharpness-Aware Minimisation (Foret et al. 2021) as a wrapper around any torch optimiser.

One SAM update minimises ``max_{||e|| <= rho} L(w + e)`` to first order:

1. ``g = grad L(w)`` (the caller's first backward pass);
2. ``first_step``: ``e = rho * g / ||g||`` and move to ``w + e``;
3. ``g' = grad L(w + e)`` (the caller's second backward pass);
4. ``second_step``: restore ``w`` exactly, then let the base optimiser step with ``g'``.

DSI++ uses it to find flatter minima that forget less when later corpora are indexed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SAM:
    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05) -> None:
        if rho <= 0:
            raise ValueError("rho must be positive (use the base optimiser for rho = 0)")
        self.base = base
        self.rho = rho
        self._perturbations: dict[torch.nn.Parameter, torch.Tensor] = {}

    def _params_with_grad(self) -> list[torch.nn.Parameter]:
        return [
            param
            for group in self.base.param_groups
            for param in group["params"]
            if param.grad is not None
        ]

    @torch.no_grad()
    def first_step(self) -> None:
        """Climb to ``w + rho * g / ||g||`` using the gradients currently stored in ``.grad``."""
        params = self._params_with_grad()
        if not params:
            raise RuntimeError("first_step needs gradients: call backward() first")
        norm = torch.linalg.vector_norm(
            torch.stack(
                [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
            )
        )
        scale = self.rho / (norm + 1e-12)
        self._perturbations = {}
        for param in params:
            assert param.grad is not None
            perturbation = param.grad * scale
            param.add_(perturbation)
            self._perturbations[param] = perturbation

    @torch.no_grad()
    def second_step(self) -> None:
        """Return to ``w`` and take the base optimiser's step with the perturbed gradients."""
        if not self._perturbations:
            raise RuntimeError("second_step without first_step")
        for param, perturbation in self._perturbations.items():
            param.sub_(perturbation)
        self._perturbations = {}
        self.base.step()

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A full SAM update: two forward/backward passes of ``loss_fn``; returns the first loss."""
        self.zero_grad()
        loss = loss_fn()
        loss.backward()  # type: ignore[no-untyped-call]
        self.first_step()
        self.zero_grad()
        loss_fn().backward()  # type: ignore[no-untyped-call]
        self.second_step()
        self.zero_grad()
        return loss.detach()
