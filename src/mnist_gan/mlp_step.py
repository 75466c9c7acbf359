"""The mlp GAN's training step with its backward passes written out: eager on the CPU, compiled
as a whole on a GPU.

:func:`mnist_gan.step.gan_step` is the step for every configuration: autograd records
each forward op and replays its backward. For the mlp networks that bookkeeping is a large
part of a CPU step: batch 128 leaves each matmul and each elementwise op only tens to hundreds
of microseconds, and the ~250 ops' autograd records, the engine's dispatch and its temporary
tensors add to each (measured on one thread of a 2-core AMD EPYC: 21.6 ms a step written out
against 26.7 ms through autograd; 146 other ops instead of 223). :class:`MLPStep` is the same
step (the same networks, losses, dropout masks, optimizers, EMA and metrics) with the
gradients computed by the chain rule as ATen calls: a matmul per weight gradient and per
input gradient, written into the weights' ``.grad`` tensors, and each activation's own
backward kernel (``leaky_relu_backward``, ``native_batch_norm_backward``, ``tanh_backward``).

In float32 it does exactly what ``gan_step`` does: the same masks (all six of a step's
dropout masks in one draw, which :func:`~mnist_gan.models._dropout_masks` makes bit-identical
to the two draws of ``gan_step``), the same BatchNorm kernels and running statistics, the same
fused Adam kernel. The sums run in another order (a bias gradient as ``sum(0)`` rather than
autograd's reduction; the loss gradients in closed form), so the weights agree with autograd's
to float32 rounding, not bit for bit (tested: allclose after several steps, for every
activation, loss and option it covers). Like every CPU result, its weights are bit-identical
run to run on one machine, not across CPU models.

Where the CPU computes bf16 natively (AMX or AVX512-BF16; the trainer's ``train.amp``), the
hidden layers' matmuls take bf16 operands: bf16 copies of the weights (made after each update)
and of the activations and gradients that enter a matmul, with float32 sums in the kernel and
the product rounded to bf16, as autocast's matmuls do (the weight gradients too: gathered
in a bf16 buffer, converted to the float32 ``.grad`` once per network); everything else stays
float32 (the activations, BatchNorm, the loss, D's last layer, Adam's weights and moments, the
EMA). oneDNN's bf16 math for float32 matmuls (what autograd's step
uses there) does not engage without AMX: on an AMD EPYC with AVX512-BF16 (Zen 4) it ran the
float32 kernel (``brg_matmul:avx512_core``), while bf16 operands ran ``avx512_core_bf16`` at
twice the speed (the step's matmuls 5.6 against 9.4 ms, one thread). Its gradients are within
bf16 rounding of the float32 step's: cosine similarity above 0.99 for each weight on the first
step of the default networks (standard bf16 autocast through autograd: 0.94-0.98 for G).

:func:`~mnist_gan.training.select_step` gives it the mlp networks, unconditional, without
spectral norm, in one process, D judging the real and fake batch in one pass (the default
configuration among them), on the CPU, and on a CUDA GPU when ``train.compile`` compiles it
(``auto``, the default, does there). Everything else runs ``gan_step``.

**Compiled** (``compile=True``), ``torch.compile`` turns each of the step's three parts (D's
update, G's update, the EMA and metrics) into one graph (``fullgraph``), the optimizers'
updates inside (:func:`adam_math`, the fused Adam kernel's formula as foreach ops), and fuses
their elementwise work into few kernels around the matmuls. The dropout masks then come from
the compiled kernels' own random numbers, so a compiled run differs from an eager one (the
same distribution; on the CPU bit-identical run to run, tested; on a GPU not checked, where
inductor may pick kernels by timing them). Measured on an H200 (2026-12-04,
mlp, batch 128, bf16, inside the CUDA graph): 0.230 ms a step and 119 kernels, against
0.470 ms and 193 kernels for autograd's step. A part that fails to compile warns, and the step
runs eagerly from then on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mnist_gan.losses import discriminator_loss, generator_loss
from mnist_gan.models import MLPDiscriminator, MLPGenerator, _dropout_masks
from mnist_gan.optim import adam_step
from mnist_gan.step import StepParts, end_step

__all__ = ["MLPStep"]


def adam_inputs(opt: torch.optim.Optimizer) -> tuple:
    """What :func:`adam_math` takes for ``opt`` (a one-group ``torch.optim.Adam`` without weight
    decay, amsgrad or maximize, as the trainer builds): its weights, their ``.grad``, its moments
    and step counters, and its settings. Creates the state where the optimizer has none yet, as
    its fused path does on its first step (so ``opt.step()`` and ``state_dict()`` take it)."""
    group = opt.param_groups[0]
    unsupported = [k for k in ("amsgrad", "maximize") if group.get(k)]
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or group["weight_decay"]:
        unsupported.append("not a one-group Adam without weight decay")
    if unsupported:
        raise ValueError(f"the compiled mlp step's Adam update does not cover: {unsupported}")
    params = group["params"]
    for param in params:
        if not opt.state.get(param):
            opt.state[param] = {
                "step": torch.zeros((), dtype=torch.float32, device=param.device),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
    states = [opt.state[param] for param in params]
    beta1, beta2 = group["betas"]
    return (
        params,
        [param.grad for param in params],
        [state["exp_avg"] for state in states],
        [state["exp_avg_sq"] for state in states],
        [state["step"] for state in states],
        group["lr"],
        beta1,
        beta2,
        group["eps"],
    )


def adam_math(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps) -> None:
    """``torch.optim.Adam``'s update (no weight decay, amsgrad or maximize) as foreach ops, for
    the compiled step: ``torch.compile`` fuses it into a few kernels, where the fused Adam
    kernel runs on few blocks (measured on an H200: 55 us a step for the two optimizers, a
    fifth of the compiled step's GPU time). The formula of Adam's foreach (capturable) path:
    the first moment by lerp (the fused kernel's ``beta1 m + (1 - beta1) g``, equal but for
    the last bits), the second by ``beta2 v + (1 - beta2) g^2``, bias corrections from the
    (equal) step counts, ``eps`` added after the division by ``sqrt(1 - beta2^t)``."""
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    step = steps[0]
    step_size = lr / (1.0 - torch.pow(beta1, step))
    bias_correction2_sqrt = (1.0 - torch.pow(beta2, step)).sqrt()
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(updates, step_size)
    torch._foreach_sub_(params, updates)


class _FlatGrads:
    """One buffer holding a network's gradients: each weight's ``.grad`` is a view of it, so
    the global gradient norm is one reduction (not one per weight and a stack: 24 ops).

    With bf16 operands the backward pass writes its bf16 products into a bf16 buffer of the
    same layout (:meth:`of`), turned into the float32 ``.grad`` in one conversion
    (:meth:`finish`); in float32 :meth:`of` is the ``.grad`` itself.
    """

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype) -> None:
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
        self.work = self.flat if dtype == torch.float32 else self.flat.to(dtype)
        self.views = self._views(self.flat)
        self._of = dict(zip(params, self._views(self.work), strict=True))

    def _views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for p in self.params]
        return [v.view_as(p) for v, p in zip(buffer.split(sizes), self.params, strict=True)]

    def attach(self) -> None:
        """Point every ``.grad`` at its view (other code may have set them to None)."""
        for param, view in zip(self.params, self.views, strict=True):
            param.grad = view

    def of(self, param: nn.Parameter) -> torch.Tensor:
        """Where the backward pass writes ``param``'s gradient."""
        return self._of[param]

    def finish(self) -> None:
        """The gradients into the float32 ``.grad`` (nothing to do in float32)."""
        if self.work is not self.flat:
            self.flat.copy_(self.work)

    def norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.flat)


class MLPStep:
    """One training step of the mlp GAN, D's update then G's then the EMA, without autograd.

    Args:
        parts: The step's parts (:class:`~mnist_gan.step.StepParts`): settings,
            weights, optimizers, EMA tensors (not its forward callables: this step runs the
            networks' layers itself).
        generator: The :class:`~mnist_gan.models.MLPGenerator`, in training mode.
        discriminator: The :class:`~mnist_gan.models.MLPDiscriminator`, in training mode.
        bf16: Whether the hidden layers' matmuls take bf16 operands (the trainer's ``amp`` on a
            device with native bf16). D's last layer (to one logit) computes in float32 either
            way, as :class:`~mnist_gan.models.ScoreLinear` does. The step needs no oneDNN bf16
            math setting (the trainer sets that for the autograd step only): its float32 matmuls
            are meant to be float32.
        compile: Compile the step's parts with ``torch.compile`` (see the module's docstring).
    """

    def __init__(
        self,
        parts: StepParts,
        generator: MLPGenerator,
        discriminator: MLPDiscriminator,
        bf16: bool,
        compile: bool = False,
    ) -> None:
        self._adam_step = adam_step  # the eager update; a test swaps it to see it unused
        # The hidden layers' matmul operands: bf16 copies of weights and activations where the
        # CPU computes bf16 natively, else the float32 tensors themselves (.to() is then a no-op).
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.g_grads = _FlatGrads(parts.g_params, self.dtype)
        self.d_grads = _FlatGrads(parts.d_params, self.dtype)
        self.parts, self.cfg = parts, parts.cfg
        net = list(generator.net)
        self.g_linear = [m for m in net if isinstance(m, nn.Linear)]
        self.g_norm = [m for m in net if isinstance(m, nn.BatchNorm1d)]
        assert not self.g_norm or len(self.g_norm) == len(self.g_linear) - 1
        self.d_linear = [m for m in discriminator.net if isinstance(m, nn.Linear)]
        act = next(m for m in discriminator.net if isinstance(m, (nn.ReLU, nn.LeakyReLU)))
        self.slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0  # 0: ReLU
        self.p, self.hidden = discriminator.dropout, discriminator.hidden
        self.device = parts.g_params[0].device
        # The step's three parts (D's update, G's update, the EMA and metrics), compiled when
        # asked (each on its first call, with the optimizers' updates inside); _run calls them.
        self._parts_fns = {"d": self._d_update, "g": self._g_update, "end": self._end}
        self._compiled: dict[str, Callable[..., Any]] | None = None
        if compile:
            self._compiled = {
                name: torch.compile(fn, dynamic=False, fullgraph=True)
                for name, fn in self._parts_fns.items()
            }
        self._proven: set[str] = set()  # compiled parts that ran once

    @property
    def compiled(self) -> bool:
        """Whether the step runs compiled (until a compilation fails)."""
        return self._compiled is not None

    def _run(self, name: str, *args: Any) -> Any:
        """Part ``name`` of the step, compiled when asked. ``torch.compile`` compiles a part on
        its first call, before running it; where that fails (no compiler, an unsupported op)
        the step warns once and runs every part eagerly from then on: the same computation. Any
        failure of a part's first call is taken for the compiler's (compiling comes first: a
        part's update has not run); a later one is raised."""
        if self._compiled is not None:
            try:
                out = self._compiled[name](*args)
            except Exception as exc:  # compilers fail in many ways
                if name in self._proven:  # it compiled and ran before: a real error
                    raise
                warnings.warn(
                    f"train.compile: compiling the mlp step failed ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:300]}); training eagerly",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._compiled = None
            else:
                self._proven.add(name)
                return out
        return self._parts_fns[name](*args)

    def _weights(self, layers: list[nn.Linear]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layers' weights and biases as operands (bf16 copies of the current ones)."""
        return [(lin.weight.to(self.dtype), lin.bias.to(self.dtype)) for lin in layers]

    def _linear(self, h: torch.Tensor, operands: tuple[torch.Tensor, torch.Tensor],
                out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``h @ weight.T + bias`` from the operands, in float32 (into ``out`` if given): one
        addmm; with bf16 operands, its bf16 result converted."""
        weight, bias = operands
        if self.dtype == torch.float32:
            return torch.addmm(bias, h, weight.t(), out=out)
        product = torch.addmm(bias, h, weight.t())
        return product.float() if out is None else out.copy_(product)

    # --- D -----------------------------------------------------------------------------------

    def _d_forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None):
        """D on flat images x (N, 784): logits (N,), and what its backward needs: the hidden
        layers' pre-activations (float32), their inputs as operands, D's last activation."""
        weights = self._weights(self.d_linear[:-1])
        pre, ops = [], [x.to(self.dtype)]
        for i in range(len(self.d_linear) - 1):
            u = self._linear(ops[-1], weights[i])
            h = torch.nn.functional.leaky_relu(u, self.slope) if self.slope else torch.relu(u)
            if masks is not None:
                h.mul_(masks[i])
            pre.append(u)
            if i < len(self.d_linear) - 2:
                ops.append(h.to(self.dtype))
        last = self.d_linear[-1]
        # one logit: float32 (faster than bf16 at this shape)
        logits = torch.addmm(last.bias, h, last.weight.t()).squeeze(1)
        return logits, (pre, ops, h, weights)

    def _d_backward(self, dlogits, saved, masks, weights: bool) -> torch.Tensor | None:
        """Back through D from the logits' gradient (N,): into D's gradients when ``weights``
        (D's update: no input gradient), else the input gradient (N, 784) alone (G's update)."""
        pre, ops, top, w_ops = saved
        grads, last = self.d_grads, self.d_linear[-1]
        if weights:
            grads.of(last.weight).copy_(torch.mm(dlogits.unsqueeze(0), top))
            grads.of(last.bias).copy_(dlogits.sum(0, keepdim=True))
        da = dlogits.unsqueeze(1) * last.weight  # (N, 1) x (1, H): the outer product
        for i in reversed(range(len(self.d_linear) - 1)):
            lin = self.d_linear[i]
            if masks is not None:
                da = da * masks[i]
            if self.slope:
                du = torch.ops.aten.leaky_relu_backward(da, pre[i], self.slope, False)
            else:
                du = torch.ops.aten.threshold_backward(da, pre[i], 0.0)
            du = du.to(self.dtype)
            if weights:
                torch.mm(du.t(), ops[i], out=grads.of(lin.weight))
                torch.sum(du, 0, out=grads.of(lin.bias))
            if i > 0 or not weights:  # D's update needs no gradient for the images
                da = du.mm(w_ops[i][0])
        return None if weights else da

    # --- G -----------------------------------------------------------------------------------

    def _g_forward(self, z: torch.Tensor, dest: torch.Tensor):
        """G on z (B, latent): images (B, 784) in [-1, 1] (float32), written into ``dest`` (as
        operands: a bf16 copy), and what its backward needs."""
        weights = self._weights(self.g_linear)
        saved, h = [], z.to(self.dtype)
        for i in range(len(self.g_linear) - 1):
            v = self._linear(h, weights[i])
            stats = None
            if self.g_norm:
                bn = self.g_norm[i]
                n, mean, invstd = torch.native_batch_norm(
                    v, bn.weight, bn.bias, bn.running_mean, bn.running_var, True,
                    bn.momentum, bn.eps,
                )  # fmt: skip
                bn.num_batches_tracked.add_(1)  # as BatchNorm1d's forward counts
                stats = (v, mean, invstd)
                v = n
            r = torch.relu(v)
            saved.append((h, stats, r))
            h = r.to(self.dtype)
        # tanh(x) = 2 sigmoid(2x) - 1: 154 against 355 us for 128 x 784 on one thread of an AMD
        # EPYC (AVX2), whose torch.tanh is slow; within 1.8e-7 of the exact value (torch.tanh:
        # 6e-8), far below a pixel's 1/255.
        out = dest if dest.dtype == torch.float32 else None
        images = self._linear(h, weights[-1], out=out).mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)
        if images is not dest:
            dest.copy_(images)
        return images, (saved, h, weights)

    def _g_backward(self, dimages: torch.Tensor, images, saved) -> None:
        """Back through G from the images' gradient (B, 784) into G's gradients."""
        layers, top, w_ops = saved
        grads, last = self.g_grads, self.g_linear[-1]
        dv = torch.ops.aten.tanh_backward(dimages, images).to(self.dtype)
        torch.mm(dv.t(), top, out=grads.of(last.weight))
        torch.sum(dv, 0, out=grads.of(last.bias))
        for i in reversed(range(len(self.g_linear) - 1)):
            lin = self.g_linear[i]
            h, stats, r = layers[i]
            dv = torch.ops.aten.threshold_backward(dv.mm(w_ops[i + 1][0]), r, 0.0)
            if stats is not None:
                bn = self.g_norm[i]
                v, mean, invstd = stats
                dv, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                    dv, v, bn.weight, bn.running_mean, bn.running_var, mean, invstd, True,
                    bn.eps, [True, True, True],
                )  # fmt: skip
                grads.of(bn.weight).copy_(dgamma)
                grads.of(bn.bias).copy_(dbeta)
            dv = dv.to(self.dtype)
            torch.mm(dv.t(), h, out=grads.of(lin.weight))
            torch.sum(dv, 0, out=grads.of(lin.bias))

    # --- the step ------------------------------------------------------------------------------

    def _loss_grads(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """d loss_d / d logits (2B,) for logits [real; fake], in closed form."""
        b = logits.shape[0] // 2
        if self.cfg.loss == "hinge":  # relu(1 - real).mean() + relu(1 + fake).mean()
            real, fake = logits.chunk(2)
            return torch.cat([(real < 1.0).float().neg_(), (fake > -1.0).float()]).div_(b)
        # bce/minimax D: target t on real, 0 on fake: (sigmoid(x) - target) / B
        grad = probs.clone()
        grad[:b] -= 1.0 - self.cfg.label_smoothing
        return grad.div_(b)

    def _g_loss_grad(self, logits: torch.Tensor) -> torch.Tensor:
        """d loss_g / d logits (B,)."""
        b = logits.shape[0]
        if self.cfg.loss == "bce":  # softplus(-x).mean(): (sigmoid(x) - 1) / B
            return torch.sigmoid(logits).sub_(1.0).div_(b)
        if self.cfg.loss == "minimax":  # -softplus(x).mean()
            return torch.sigmoid(logits).neg_().div_(b)
        return torch.full_like(logits, -1.0 / b)  # hinge: -x.mean()

    def _masks(self, b: int) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """The step's six dropout masks: D's three over 2B rows in D's update, then its three
        over B rows in G's; (None, None) without dropout.

        Eagerly on the CPU, in one draw of the global RNG (the same words gan_step's two draws
        take). On a GPU, and compiled anywhere, from uniform numbers on the device (compiled,
        generated inside the kernels that apply them)."""
        if self.p <= 0:
            return None, None
        shapes = [(2 * b, w) for w in self.hidden] + [(b, w) for w in self.hidden]
        if self.device.type == "cpu" and not torch.compiler.is_compiling():
            masks = _dropout_masks(shapes, self.p)
        else:  # one draw for the six, each mask a view of it
            sizes = [math.prod(s) for s in shapes]
            keep = torch.rand(sum(sizes), device=self.device).ge_(self.p).float()
            keep.mul_(1.0 / (1.0 - self.p))
            masks = [m.view(s) for m, s in zip(keep.split(sizes), shapes, strict=True)]
        k = len(self.hidden)
        return masks[:k], masks[k:]

    def _adam(self, opt: torch.optim.Optimizer, inputs: tuple | None) -> None:
        """``opt``'s update: compiled, :func:`adam_math` on ``inputs``; eagerly (and after a
        failed compile, which passes them too), the fused kernel
        (:func:`~mnist_gan.optim.adam_step`)."""
        if torch.compiler.is_compiling():
            adam_math(*inputs)
        else:
            self._adam_step(opt)

    def _d_update(self, real: torch.Tensor, z: torch.Tensor, adam: tuple | None):
        """D's update, on the real batch and G's images in one pass, and G's forward pass:
        D's probabilities (2B,), loss and gradient norm, and what :meth:`_g_update` needs.
        ``adam``: :func:`adam_inputs` of D's optimizer when compiled, else None."""
        cfg, b = self.cfg, z.shape[0]
        masks_d, masks_g = self._masks(b)
        # G writes its images below the real ones, in D's input operand.
        both = torch.empty(2 * b, real[0].numel(), dtype=self.dtype, device=z.device)
        both[:b].copy_(real.reshape(b, -1))
        images, g_saved = self._g_forward(z, dest=both[b:])
        logits, d_saved = self._d_forward(both, masks_d)
        probs = torch.sigmoid(logits)
        real_logits, fake_logits = logits.chunk(2)
        loss_d = discriminator_loss(cfg.loss, real_logits, fake_logits, cfg.label_smoothing)
        self._d_backward(self._loss_grads(logits, probs), d_saved, masks_d, weights=True)
        self.d_grads.finish()
        grad_norm = self.d_grads.norm()
        self._adam(self.parts.opt_d, adam)
        return probs, loss_d, grad_norm, (both[b:], images, g_saved, masks_g)

    def _g_update(self, fake: torch.Tensor, images: torch.Tensor, g_saved, masks_g,
                  adam: tuple | None):  # fmt: skip
        """G's update through the updated D: G's loss and gradient norm. ``adam``: as for
        :meth:`_d_update`, G's optimizer."""
        logits_g, d_saved_g = self._d_forward(fake, masks_g)
        loss_g = generator_loss(self.cfg.loss, logits_g)
        dimages = self._d_backward(self._g_loss_grad(logits_g), d_saved_g, masks_g,
                                   weights=False)  # fmt: skip
        self._g_backward(dimages, images, g_saved)
        self.g_grads.finish()
        grad_norm = self.g_grads.norm()
        self._adam(self.parts.opt_g, adam)
        return loss_g, grad_norm

    def _end(self, probs: torch.Tensor, values, record: torch.Tensor) -> None:
        end_step(self.parts, probs, values, record)

    def __call__(self, batch: Mapping[str, torch.Tensor], record: torch.Tensor) -> None:
        """One step on ``batch`` (``real`` (B, 1, 28, 28), ``z`` (B, latent)); METRICS to
        ``record`` (6,). What :func:`~mnist_gan.step.gan_step` does, without autograd."""
        p = self.parts
        with torch.no_grad():
            self.d_grads.attach()
            self.g_grads.attach()
            compiled = self._compiled is not None
            adam_d = adam_inputs(p.opt_d) if compiled else None
            probs, loss_d, grad_norm_d, carry = self._run("d", batch["real"], batch["z"], adam_d)
            adam_g = adam_inputs(p.opt_g) if compiled else None
            loss_g, grad_norm_g = self._run("g", *carry, adam_g)
            self._run("end", probs, (loss_d, loss_g, grad_norm_g, grad_norm_d), record)
