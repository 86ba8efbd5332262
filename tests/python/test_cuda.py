"""CUDA tensors (skipped without a GPU): the ops' CUDA kernels (the device-generic implementation
until dedicated kernels exist) against the core on the CPU, Int4Linear and a converted Hugging Face
model on the GPU under bf16 autocast, and torch.compile on the GPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import int4train

from conftest import LSQ_RECIPES, RECIPES, requires_cuda, snr_db, step_tensor

pytestmark = requires_cuda
ops = torch.ops.int4train

EXACT_FORWARD = ("int8", "lsq_luq", "hq", "hq_bs", "hq_lss")
EXACT_BACKWARD = ("int8", "hq", "hq_bs", "hq_lss")


def quantized_recipe(recipe: str, **options) -> int4train.Recipe:
    """`recipe` with every call quantized: these tests' layers are far below the small-shape
    rule's size (Recipe.dense_fallback, on by default), which on the GPU would run them as
    F.linear; test_cuda_dense_fallback_rule checks the rule itself."""
    return int4train.Recipe(recipe, dense_fallback="never", **options)


def cpu_args(recipe, n, d, c, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dtype)
    x[:, 2] *= 20
    w = (torch.randn(c, d, generator=g) / math.sqrt(d)).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    block, sx, sw = 1, None, None
    if recipe in LSQ_RECIPES:
        if recipe != "lsq_luq":
            block = int(ops.select_hadamard_block(x, w)[0])
        sx = ops.lsq_init_step(ops.hadamard_transform(x, block))
        sw = ops.lsq_init_step(ops.hadamard_transform(w, block))
    return [x, w, b, sx, sw, recipe, block, 99, step_tensor(12), 4]


def to_cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_linear_matches_cpu_core(recipe, dtype):
    for n, d, c in [(3, 16, 5), (65, 256, 96)]:
        args = cpu_args(recipe, n, d, c, dtype)
        cpu = ops.linear_forward(*args)
        gpu = ops.linear_forward(*to_cuda(args))
        for name, a, b in zip(("y", "codes", "aux", "scale", "saved_step"), cpu, gpu):
            assert b.is_cuda and a.dtype == b.dtype and a.shape == b.shape, name
            if name == "y" and recipe not in EXACT_FORWARD:
                torch.testing.assert_close(b.cpu(), a, rtol=2e-2, atol=2e-2)
            else:
                assert torch.equal(a, b.cpu()), (name, recipe)
        y, codes, aux, scale, saved = cpu
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        bargs = [gy, args[0] if recipe == "fp" else None, codes, aux, scale, args[1], args[3],
                 args[4], recipe, args[6], args[7], saved, args[9], [True] * 5]
        cpu_g = ops.linear_backward(*bargs)
        gpu_g = ops.linear_backward(*to_cuda(bargs))
        names = ("grad_x", "grad_w", "grad_bias", "grad_input_step", "grad_weight_step", "stats")
        for name, a, b in zip(names, cpu_g, gpu_g):
            assert b.is_cuda and a.dtype == b.dtype and a.shape == b.shape, name
            if name == "stats" or (name in ("grad_x", "grad_w") and recipe in EXACT_BACKWARD):
                assert torch.equal(a, b.cpu()), (name, recipe)
            else:
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                torch.testing.assert_close(b.cpu(), a, rtol=tol, atol=tol * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("recipe", LSQ_RECIPES)
def test_cuda_gemm_engines_match_cpu_core(recipe):
    # Every engine the device has (INT8 always, FP8 from compute capability 8.9) gives the CPU
    # core's bits: the forward's INT8 product and scale-and-bias pass, hq_lss's INT8 compacted
    # input-gradient product. gemm=fp8 on a device without FP8 is an error naming gemm.
    major, minor = torch.cuda.get_device_capability()
    engines = ["int8", "fp8"] if (major, minor) >= (8, 9) else ["int8"]
    for n, d, c in [(3, 16, 5), (7, 12, 5), (65, 256, 96)]:
        for dtype in (torch.float32, torch.bfloat16):
            args = cpu_args(recipe, n, d, c, dtype)
            cpu = ops.linear_forward(*args)
            y, codes, aux, scale, saved = cpu
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            bargs = [gy, None, codes, aux, scale, args[1], args[3], args[4], recipe, args[6],
                     args[7], saved, args[9], [True] * 5]
            cpu_g = ops.linear_backward(*bargs) if recipe in ("hq_bs", "hq_lss") else None
            auto_g = ops.linear_backward(*to_cuda(bargs)) if cpu_g is not None else None
            for gemm in engines:
                spec = f"{recipe}:gemm={gemm}"
                gpu = ops.linear_forward(*to_cuda(args[:5] + [spec] + args[6:]))
                for name, a, b in zip(("y", "codes", "aux"), cpu, gpu):
                    assert torch.equal(a, b.cpu()), (name, spec, n, d, c, dtype)
                if cpu_g is not None:
                    gpu_g = ops.linear_backward(*to_cuda(bargs[:8] + [spec] + bargs[9:]))
                    for i in (0, 1, 2, 5):  # grad_x, grad_w, grad_bias, rows kept: the CPU's bits
                        assert torch.equal(cpu_g[i], gpu_g[i].cpu()), (i, spec, n, d, c, dtype)
                    for i in range(6):  # and the default engine's, the step gradients included
                        assert torch.equal(auto_g[i], gpu_g[i]), (i, spec, n, d, c, dtype)
    if "fp8" not in engines:
        with pytest.raises(ValueError, match="gemm: fp8 needs FP8 tensor cores"):
            ops.linear_forward(*to_cuda(cpu_args(recipe, 3, 16, 5, torch.float32)[:5]
                                        + [f"{recipe}:gemm=fp8"] + args[6:]))


@pytest.mark.parametrize("recipe", ["hq_bs", "hq_lss"])
def test_cuda_backward_bias_alone_matches_cpu_core(recipe):
    # Only the bias gradient asked for (a frozen weight, as in BitFit): the device kernels run the
    # reduction pass alone; its column sums (several 128-row blocks, a partial last one, an odd
    # width) equal the CPU core's bit for bit, and the unselected outputs are empty.
    for dtype in (torch.float32, torch.bfloat16):
        args = cpu_args(recipe, 300, 64, 37, dtype)
        y, codes, aux, scale, saved = ops.linear_forward(*args)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        bargs = [gy, None, codes, aux, scale, args[1], args[3], args[4], recipe, args[6], args[7],
                 saved, args[9], [False, False, True, False, False]]
        cpu_g = ops.linear_backward(*bargs)
        gpu_g = ops.linear_backward(*to_cuda(bargs))
        assert gpu_g[2].dtype == dtype and torch.equal(cpu_g[2], gpu_g[2].cpu())
        assert all(g.numel() == 0 for g in (gpu_g[0], gpu_g[1], gpu_g[3], gpu_g[4]))


def backward_cpu_and_cuda(spec, dtype=torch.float32, row_scales=False, bad=None, mask=None):
    """linear_backward of recipe `spec` on the CPU core and on CUDA, from one CPU forward of 65
    tokens (256 -> 96); row_scales: the gradient's token rows scaled by 2^0 .. 2^-6 (every
    grad_scale=row exponent); bad: a value for one element of the gradient (inf, nan); mask: the
    outputs asked for (default all five). Returns the backward's arguments and both results."""
    args = cpu_args(spec.split(":")[0], 65, 256, 96, dtype)
    args[5] = spec
    y, codes, aux, scale, saved = ops.linear_forward(*args)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    if row_scales:
        gy = gy * (2.0 ** -torch.arange(65).remainder(7)).unsqueeze(1)
    if bad is not None:
        gy[0, 0] = bad
    bargs = [gy.to(dtype), None, codes, aux, scale, args[1], args[3], args[4], spec, args[6],
             args[7], saved, args[9], [True] * 5 if mask is None else mask]
    return bargs, ops.linear_backward(*bargs), ops.linear_backward(*to_cuda(bargs))


@pytest.mark.parametrize("budget", [1.5, 2.0])
def test_cuda_lss_budget_matches_cpu_core(budget):
    # The recipe spec reaches the CUDA path: the same sampled rows and gradients as the CPU core.
    bargs, cpu, gpu = backward_cpu_and_cuda(f"hq_lss:lss_budget={budget!r}")
    for i in (0, 1, 5):
        assert torch.equal(cpu[i], gpu[i].cpu()), i
    if budget == 2.0:
        bargs[8] = "hq_bs"
        bs = ops.linear_backward(*bargs)
        assert torch.equal(cpu[0], bs[0]) and torch.equal(cpu[1], bs[1])


@pytest.mark.parametrize("spec", ["hq_bs:grad_scale=row", "hq_lss:grad_scale=row",
                                  "hq_lss:lss_budget=1.5,grad_scale=row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_grad_scale_row_matches_cpu_core(spec, dtype):
    # grad_scale=row on CUDA (the kernels: hq_lss's weight gradient as two products, its hi and lo
    # rows'): the same rows, exponents and gradients as the CPU core, on token rows spanning every
    # exponent.
    _, cpu, gpu = backward_cpu_and_cuda(spec, dtype, row_scales=True)
    for i in (0, 1, 5):
        assert torch.equal(cpu[i], gpu[i].cpu()), i
    for i in (2, 3, 4):  # the bias and step gradients: fp64 sums in another order
        torch.testing.assert_close(gpu[i].cpu(), cpu[i], rtol=1e-5, atol=1e-6)
    # A non-finite gradient (s_g not finite, every row exponent 0, every code 0, no row kept):
    # the CPU's NaN pattern (NaN where the LSQ mask passes the gradient, 0 elsewhere) and counts.
    for bad in (float("inf"), float("nan")):
        _, cpu, gpu = backward_cpu_and_cuda(spec, dtype, row_scales=True, bad=bad)
        for i in (0, 1, 5):
            assert torch.equal(cpu[i].isnan(), gpu[i].cpu().isnan()), (i, bad)
            assert torch.equal(cpu[i].nan_to_num(), gpu[i].cpu().nan_to_num()), (i, bad)
    # One gradient at a time (a frozen weight; a first layer without an input gradient): the device
    # runs only that product, its selection and row scales, and gives the CPU's bits.
    for mask, outs in (([True, False, False, True, False], (0, 3)),
                       ([False, True, True, False, True], (1, 2, 4))):
        _, cpu, gpu = backward_cpu_and_cuda(spec, dtype, row_scales=True, mask=mask)
        assert torch.equal(cpu[outs[0]], gpu[outs[0]].cpu()), (mask, spec)
        for i in outs[1:]:
            torch.testing.assert_close(gpu[i].cpu(), cpu[i], rtol=1e-5, atol=1e-6)
        for i in range(5):
            if i not in outs:
                assert gpu[i].numel() == 0, (i, mask)
        if "hq_lss" in spec:  # the kept count of the gradient asked for; 0 for the other
            assert torch.equal(cpu[5], gpu[5].cpu()), (mask, cpu[5], gpu[5])


def test_cuda_lsq_step_kernels_match_cpu():
    # The one-launch steps and their gradients (fp32 and bf16 parameters, mixed) equal the CPU's
    # ATen form, itself equal to PyTorch's clamp_min(abs(p)) autograd (test_ops.py), bit for bit
    # (a NaN as a NaN: the GPU's arithmetic gives its canonical NaN, not the input's payload).
    values = (2.0, -3.0, -0.37, 1e-40, -1e-40, 0.0, -0.0, math.inf, -math.inf, math.nan)
    for da, db in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                   (torch.float32, torch.bfloat16)):
        for a in values:
            pa, pb = torch.tensor(a, dtype=da), torch.tensor([-0.75], dtype=db)
            ga, gb = torch.tensor(1.5), torch.tensor(-0.3)
            cpu = ops._lsq_steps(pa, pb) + ops._lsq_step_grads(pa, pb, ga, gb)
            dev = ops._lsq_steps(pa.cuda(), pb.cuda()) + ops._lsq_step_grads(
                pa.cuda(), pb.cuda(), ga.cuda(), gb.cuda())
            for c, g in zip(cpu, dev):
                assert c.dtype == g.dtype and c.shape == g.shape and g.is_cuda
                both_nan = bool(c.isnan().all()) and bool(g.isnan().all().cpu())
                assert both_nan or torch.equal(c.reshape(-1).view(torch.uint8),
                                               g.cpu().reshape(-1).view(torch.uint8)), (a, da, db,
                                                                                         c, g)
            none_a, only_b = ops._lsq_step_grads(pa.cuda(), pb.cuda(), torch.empty(0).cuda(),
                                                 gb.cuda())
            assert none_a.numel() == 0 and torch.equal(only_b.cpu(), cpu[3])


def test_cuda_components_match_cpu():
    x = torch.randn(9, 64)
    for block in (1, 4, 64):
        assert torch.equal(ops.hadamard_transform(x.cuda(), block).cpu(), ops.hadamard_transform(x, block))
    s = ops.lsq_init_step(x)
    torch.testing.assert_close(ops.lsq_init_step(x.cuda()).cpu(), s, rtol=1e-6, atol=0)
    # The MSE step is searched on the host: the same bits on the device (a sampled large input too).
    assert torch.equal(ops.lsq_mse_step(x.cuda()).cpu(), ops.lsq_mse_step(x))
    big = torch.randn(1500, 1024).bfloat16()
    assert torch.equal(ops.lsq_mse_step(big.cuda()).cpu(), ops.lsq_mse_step(big))
    for packed in (False, True):
        for a, b in zip(ops.lsq_quantize(x, s, packed), ops.lsq_quantize(x.cuda(), s.cuda(), packed)):
            assert torch.equal(a, b.cpu())
        for a, b in zip(ops.quantize_bitsplit(x, 5, 2**35 + 1, packed),
                        ops.quantize_bitsplit(x.cuda(), 5, 2**35 + 1, packed)):
            assert torch.equal(a, b.cpu())
    codes = torch.randint(-8, 8, (5, 33), dtype=torch.int8)
    assert torch.equal(ops.pack_int4(codes.cuda()).cpu(), ops.pack_int4(codes))
    assert torch.equal(ops.gemm_s32(codes.cuda(), codes.cuda()).cpu(), ops.gemm_s32(codes, codes))
    w = torch.randn(7, 64)
    a, b = ops.select_hadamard_block(x, w), ops.select_hadamard_block(x.cuda(), w.cuda())
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    scores = torch.rand(20)
    assert torch.equal(ops.lss_probabilities(scores.cuda(), 7.0).cpu(), ops.lss_probabilities(scores, 7.0))


@pytest.mark.parametrize("recipe", RECIPES)
def test_cuda_module_matches_cpu_module(recipe):
    torch.manual_seed(0)
    cpu = int4train.Int4Linear(64, 32, recipe=quantized_recipe(recipe), layer_id=2)
    x = torch.randn(4, 10, 64)
    with torch.no_grad():
        cpu(x)  # initialise once (the fp64 mean of lsq_init_step is order-dependent)
    gpu = copy.deepcopy(cpu).cuda()
    xc, xg = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    yc, yg = cpu(xc), gpu(xg)
    exact = recipe in EXACT_FORWARD
    if exact:
        assert torch.equal(yc, yg.cpu())
    else:
        torch.testing.assert_close(yg.cpu(), yc, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(yc)
    yc.backward(g)
    yg.backward(g.cuda())
    if recipe in EXACT_BACKWARD:
        assert torch.equal(xc.grad, xg.grad.cpu())
        assert torch.equal(cpu.weight.grad, gpu.weight.grad.cpu())
    else:
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)
    assert int(gpu.step) == 2 and gpu.step.is_cuda


@pytest.mark.parametrize("recipe", ["hq_bs", "hq_lss"])
def test_cuda_training_step_graph_capture(recipe):
    # The layer's whole training step (forward, backward, the step counter) in one CUDA graph: the
    # capture fails on any host synchronisation, and each replay reads the advanced step on the device,
    # so its random streams are those of an eager step at that step (compared bit for bit).
    torch.manual_seed(0)
    layer = int4train.Int4Linear(64, 32, recipe=quantized_recipe(recipe), layer_id=3).cuda()
    x = torch.randn(48, 64, device="cuda", requires_grad=True)
    gy = torch.randn(48, 32, device="cuda")
    with torch.no_grad():
        layer(x)  # initialise: the first batch's statistics are read on the host
    ref = copy.deepcopy(layer)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (cuBLASLt heuristics, allocations)
        for _ in range(2):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(gy)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(gy)
    for _ in range(3):
        step = int(layer.step)
        graph.replay()
        torch.cuda.synchronize()
        assert int(layer.step) == step + 1
        ref.step.fill_(step)
        ref.zero_grad(set_to_none=True)
        xr = x.detach().clone().requires_grad_(True)
        yr = ref(xr)
        yr.backward(gy)
        assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)
        for a, b in zip(layer.parameters(), ref.parameters()):
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("recipe", ["hq_bs", "hq_lss"])
def test_cuda_compile_reduce_overhead_matches_eager(recipe):
    # torch.compile(mode="reduce-overhead"): inductor records the converted model's forward and
    # backward in CUDA graphs (none skipped: the ops read nothing on the host) and replays them; the
    # parameters after several optimizer steps, and the step counters, are eager's bit for bit (the
    # replays read the advancing counter on the device, so each step draws that step's bits). ReLU
    # between the layers: exact in every implementation, so any difference is the layers'.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 64))
    eager = eager.to("cuda", torch.bfloat16)
    int4train.convert_(eager, recipe=quantized_recipe(recipe))
    eager(torch.randn(16, 96, device="cuda", dtype=torch.bfloat16))  # initialise
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, model)]
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(5):
        x = torch.randn(40, 96, device="cuda", dtype=torch.bfloat16, generator=g)
        for m, opt in zip((eager, compiled), opts):
            opt.zero_grad(set_to_none=True)
            m(x).float().square().mean().backward()
            opt.step()
    torch.cuda.synchronize()
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    skipped = counters["inductor"]["cudagraph_skips"]
    graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    torch._dynamo.reset()
    assert recorded > 0 and skipped == 0, (recorded, skipped)
    assert graphs == 1 and not breaks, (graphs, breaks)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    for i in (0, 2):
        assert int(model[i].step) == int(eager[i].step) == 6


def test_cuda_dense_fallback_rule():
    # Recipe.dense_fallback on CUDA: a call below the threshold is F.linear itself (forward and
    # gradients bit for bit, no step gradient); above it, the quantized layer as without the rule.
    torch.manual_seed(0)
    base = int4train.Int4Linear(64, 32, recipe=quantized_recipe("hq_bs"), layer_id=1).cuda()
    x = torch.randn(5, 7, 64, device="cuda")
    with torch.no_grad():
        base(x)  # initialise
    calls = 5 * 7 * 64 * 32
    cases = [(calls + 1.0, True), (float(calls), False), ("auto", True), (None, True),
             ("never", False)]
    for threshold, dense in cases:
        layer = copy.deepcopy(base)
        layer.recipe = (int4train.Recipe("hq_bs") if threshold is None  # the default: "auto"
                        else int4train.Recipe("hq_bs", dense_fallback=threshold))
        ref = copy.deepcopy(base)
        xl, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y = layer(xl)
        if dense:
            yr = nn.functional.linear(xr, ref.weight, ref.bias)
        else:
            yr = ref(xr)
        assert torch.equal(y, yr), threshold
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        assert torch.equal(xl.grad, xr.grad) and torch.equal(layer.weight.grad, ref.weight.grad)
        assert torch.equal(layer.bias.grad, ref.bias.grad)
        assert (layer.input_step.grad is None) == dense
        assert int(layer.step) == int(base.step) + (0 if dense else 1)


def test_cuda_hf_bert_bf16_autocast():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=256,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ref = transformers.BertModel(cfg).cuda()
    model = copy.deepcopy(ref)
    int4train.convert_(model, recipe=quantized_recipe("hq_lss"))
    ids = torch.randint(0, 200, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref = ref(input_ids=ids).last_hidden_state
        y = model(input_ids=ids).last_hidden_state
    assert y.dtype == y_ref.dtype
    assert snr_db(y_ref.float(), y.float()) > 25
    y.float().square().mean().backward()
    q = model.encoder.layer[0].attention.self.query
    assert q.weight.grad is not None and q.weight.grad.dtype == torch.float32
    assert torch.isfinite(q.weight.grad).all() and torch.isfinite(q.input_step.grad)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cuda_int4_attention_matches_multihead_attention(need_weights, batch_first):
    # On the GPU, with the fp recipe (exact projections), Int4MultiheadAttention gives
    # nn.MultiheadAttention's outputs and weights under a padding and a causal mask, in training
    # mode (SDPA when no weights are asked for) and gradients too. Tolerance: PyTorch projects q,
    # k, v with one in_proj product, we with three, so cuBLAS rounds them differently (fp32).
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).cuda()
    ours = int4train.convert_(copy.deepcopy(mha), recipe=quantized_recipe("fp"))
    assert isinstance(ours, int4train.Int4MultiheadAttention)
    n, length = 3, 9
    shape = (n, length, 64) if batch_first else (length, n, 64)
    x = torch.randn(*shape, device="cuda")
    pad = torch.zeros(n, length, dtype=torch.bool, device="cuda")
    pad[1, -3:] = True
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device="cuda"), 1)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, want_w = mha(xa, xa, xa, key_padding_mask=pad, attn_mask=causal,
                       need_weights=need_weights)
    got, got_w = ours(xb, xb, xb, key_padding_mask=pad, attn_mask=causal,
                      need_weights=need_weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-5)
    else:
        assert got_w is None and want_w is None
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.out_proj.weight.grad, mha.out_proj.weight.grad,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["hq_bs", "hq_lss"])
def test_cuda_transformer_encoder_converted_whole(recipe, monkeypatch):
    # A converted nn.TransformerEncoder on the GPU: its forward close to the same converted model's
    # on the CPU (the quantized projections are exact; the attention around them is rounded
    # differently, which can move a code), every Int4Linear trains under bf16 autocast, and an
    # evaluation without gradients (PyTorch's fused fast path where nothing is converted) runs
    # every converted layer, padded batch or not.
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True),
        num_layers=2,
    )
    int4train.convert_(model, recipe=quantized_recipe(recipe))
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        model(x)  # initialise on the CPU (steps, Hadamard blocks)
    gpu = copy.deepcopy(model).cuda()
    with torch.no_grad():
        assert snr_db(model(x), gpu(x.cuda()).cpu()) > 25
    layers = [m for m in gpu.modules() if isinstance(m, int4train.Int4Linear)]
    assert len(layers) == 12
    opt = torch.optim.Adam(gpu.parameters(), lr=3e-3)
    target = torch.randn(4, 16, 64, device="cuda")
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (gpu(x.cuda()).float() - target).square().mean()
        loss.backward()
        for m in layers:
            assert torch.isfinite(m.weight.grad).all() and torch.isfinite(m.input_step.grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # on the CPU (bf16 autocast): 0.63x (hq_bs), 0.69x (hq_lss)
    assert all(int(m.step) == 10 for m in layers)  # 2 forwards without gradients, 8 steps
    gpu.eval()
    pad = torch.zeros(4, 16, dtype=torch.bool, device="cuda")
    pad[1, 10:] = True
    calls = []
    original = int4train.Int4Linear._quantized
    monkeypatch.setattr(int4train.Int4Linear, "_quantized",
                        lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        for mask in (None, pad):
            calls.clear()
            y = gpu(x.cuda(), src_key_padding_mask=mask)
            assert y.shape == x.shape and len(calls) == 12


def test_cuda_compile_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).cuda()
    int4train.convert_(model, recipe=quantized_recipe("hq_lss"))
    model(torch.randn(8, 64, device="cuda"))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model)
    x = torch.randn(16, 64, device="cuda")
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = model(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    ye.sum().backward()
    yc.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)


def test_cuda_training_cli_deterministic_runs_repeat(tmp_path, capsys):
    # Two GPU runs of the training CLI with --deterministic (hq_lss: the device kernels, LSS on the
    # device; the model's attention and cuBLAS under torch's deterministic mode) give the same loss
    # curve and validation loss, bit for bit; so does a third on the INT8 engine (--gemm int8: the
    # same integers on other tensor cores).
    import json
    from pathlib import Path

    from int4train.train import cli

    text = Path(__file__).resolve().parents[2] / "data" / "moby-dick.txt.gz"
    runs = []
    for k, extra in enumerate(["", "", "--gemm int8"]):
        out = tmp_path / str(k)
        args = (
            f"--task lm --data {text} --recipe hq_lss --steps 6 --seed 2 --device cuda "
            "--layers 1 --d-model 64 --heads 2 --context 32 --batch-size 16 --warmup 2 "
            f"--limit-train 20000 --limit-test 4000 --no-progress --deterministic --out {out} {extra}"
        )
        assert cli.main(args.split()) == 0, capsys.readouterr().err
        with open(out / "metrics.json") as f:
            runs.append(json.load(f)["runs"][0])
    assert runs[2]["recipe_spec"] == "hq_lss:gemm=int8"
    for other in runs[1:]:
        assert runs[0]["loss_curve"] == other["loss_curve"]
        assert runs[0]["metrics"]["val_loss"] == other["metrics"]["val_loss"]


def test_cuda_data_parallel_replicas_agree(tmp_path):
    # test_distributed.py's checks with the ranks' tensors on CUDA: NCCL over two GPUs where the
    # machine has them, otherwise gloo with both ranks on the one GPU.
    from test_distributed import check_ranks, run_ranks

    two = torch.cuda.device_count() >= 2
    check_ranks(run_ranks(tmp_path, "cuda", "nccl" if two else "gloo"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_training_cli_torchrun_two_gpus(tmp_path):
    # The training CLI under torchrun on two GPUs (NCCL, DDP, one process per GPU), hq_lss on the
    # device kernels: it finishes, rank 0 writes one run that records two processes.
    import json
    import subprocess
    import sys
    from pathlib import Path

    text = Path(__file__).resolve().parents[2] / "data" / "moby-dick.txt.gz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "int4train.train", "--task", "lm", "--data", str(text), "--recipe", "hq_lss",
           "--steps", "6", "--layers", "1", "--d-model", "64", "--heads", "2", "--context", "32",
           "--batch-size", "16", "--warmup", "2", "--limit-train", "20000", "--limit-test", "4000",
           "--no-progress", "--device", "cuda", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "metrics.json") as f:
        (run,) = json.load(f)["runs"]
    assert run["processes"] == 2 and run["device"] == "cuda:0"
    assert all(math.isfinite(v) for v in run["loss_curve"])


def test_cuda_activation_checkpointing_matches_plain():
    # test_module.py's check on the device kernels (the recomputation's key, step - 1, computed on
    # the device): checkpointed steps give the plain steps' gradients and counters bit for bit.
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(64, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    results = {}
    for mode in ("plain", "reentrant", "non_reentrant"):
        torch.manual_seed(0)
        model = nn.Sequential(
            int4train.Int4Linear(256, 128, recipe=quantized_recipe("hq_lss", seed=5), layer_id=0),
            nn.GELU(),
            int4train.Int4Linear(128, 64, recipe=quantized_recipe("hq_lss", seed=5), layer_id=1),
        ).cuda()
        for _ in range(3):
            model.zero_grad()
            xx = x.clone().requires_grad_()
            y = model(xx) if mode == "plain" else checkpoint(model, xx, use_reentrant=mode == "reentrant")
            y.pow(2).mean().backward()
        results[mode] = [p.grad.clone() for p in model.parameters()] + [xx.grad.clone()]
        assert [int(m.step) for m in model if isinstance(m, int4train.Int4Linear)] == [3, 3], mode
    for mode in ("reentrant", "non_reentrant"):
        for a, b in zip(results[mode], results["plain"]):
            assert torch.equal(a, b), mode
