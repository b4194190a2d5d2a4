"""Taking, or skipping, the optimizer update in each precision.

Who decides that a step is skipped:

- fp16 (Accelerate's `GradScaler`): the scaler. `accelerator.clip_grad_norm_` has already unscaled the gradients
  (recording whether any is inf or NaN), so `optimizer.step()` must run on every step: it is the scaler's
  `step()` (which skips the update after an overflow) followed by `update()` (which lowers the scale after one, and
  resets the scaler for the next step). Skipping `optimizer.step()` by hand would leave the scaler unscaled, and
  the next step's unscale raises "unscale_() has already been called on this optimizer since the last update()".
  A non-finite loss gives non-finite gradients, which the scaler finds like any overflow.
  Whether it skipped is read from the scale: `update()` lowers it exactly when the step overflowed.
  `accelerator.optimizer_step_was_skipped` cannot tell: it watches whether the wrapped optimizer's `step` was
  called, and torch's fused AdamW (the loop's) is always called, with the scaler's `found_inf` as an argument
  (accelerate#4242), so the scheduler would advance on overflow steps and none would be counted.
- bf16 and fp32 (no scaler): the loop. A step whose loss (summed over every process) or gradient norm is not
  finite is not taken: one host-device sync a step, and every process reaches the same decision.
- DeepSpeed (no Accelerate scaler): as bf16, but its own fp16 loss scaler judges the gradients, and
  `optimizer_step_was_skipped` reports it (the engine's overflow flag).
"""

from __future__ import annotations

import torch


def apply_update(accelerator, optimizer, scheduler, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Takes the optimizer step and advances the schedule, unless the step is non-finite; returns whether the update
    was applied. Call it after `accelerator.clip_grad_norm_` (which unscales fp16 gradients), on every process.
    `loss_sum`: this process' summed token loss of the step; `grad_norm`: the clipped gradients' norm (a tensor)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        before = scaler.get_scale()  # a sync, but the step's one: the scale only changes in update()
        optimizer.step()  # Accelerate's wrapper: scaler.step(optimizer), then scaler.update()
        applied = scaler.get_scale() >= before  # update() halves the scale after an overflow, else keeps or grows it
    else:
        finite = torch.isfinite(accelerator.reduce(loss_sum.clone(), reduction="sum"))
        if accelerator.mixed_precision != "fp16":  # DeepSpeed's fp16 scaler skips overflowing gradients itself
            finite &= torch.isfinite(grad_norm)
        applied = bool(finite.item())  # one sync per step: every process must agree on skipping
        if applied:
            optimizer.step()
            applied = not accelerator.optimizer_step_was_skipped
    if applied:
        scheduler.step()
    return applied

