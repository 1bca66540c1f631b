"""tritonbn inside the PyTorch stack: torch.compile, autocast, activation checkpointing,
CUDA graphs, torch.export.

- torch.compile(fullgraph=True): no graph break, the tritonbn custom ops are in the graph,
  and outputs, gradients, running statistics and num_batches_tracked match eager tritonbn
  over several training steps and in eval (momentum=None included). On CPU the kernels
  run in the Triton interpreter; Inductor compiles the rest of the model with the host C++
  compiler (one Inductor test, the other variants use the cheaper aot_eager backend).
- autocast (cpu: bf16; cuda: fp16 and bf16): same output dtypes as torch's BatchNorm
  (aten::batch_norm is in no autocast cast list: it runs in its input's dtype, and so do
  the tritonbn ops), running statistics kept in fp32.
- activation checkpointing (torch.utils.checkpoint, reentrant or not): outputs, gradients
  and state as torch's layers under it, the recomputed forward counting the batch again.
- CUDA graphs (GPU only): a captured training step (forward, backward, optimizer step)
  replayed N times gives the running statistics and num_batches_tracked of N eager steps
  of torch's BatchNorm; the eager step makes no host synchronisation.
- torch.export of a model in eval mode (and in training mode): the exported program gives
  the same outputs, also after save/load, with a dynamic batch size and after
  run_decompositions().
- torch.fx.symbolic_trace: tritonbn's layers are one call each in the graph, as torch's
  are, and the traced model runs the kernels; torch.jit.trace records torch's
  aten::batch_norm (so that TorchScript and the ONNX exporter built on it see a BatchNorm).
"""
import copy
import io
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import tritonbn
from tritonbn.functional import runs_on_triton

HAS_CUDA = torch.cuda.is_available()
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))

TRAIN_OP = "tritonbn.batch_norm_train"
STATS_OP = "tritonbn.batch_norm_stats"
APPLY_OP = "tritonbn.batch_norm_apply"


# --------------------------------------------------------------------------- helpers ----

class Net(nn.Module):
    """Every BatchNorm flavour on small shapes. Input (N, 3, 4, 4).

    bn_in sees the raw fp32 input (stays fp32 under autocast); bn2d/bn3d/bn1d see the
    output of a conv/linear (reduced precision under autocast). bn3d uses the other
    momentum mode than the rest, so each model has both momentum=None and a float; bn1d
    has no weight/bias."""

    def __init__(self, momentum=0.1):
        super().__init__()
        other = 0.1 if momentum is None else None
        self.bn_in = nn.BatchNorm2d(3, momentum=momentum)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4, momentum=momentum)
        self.bn3d = nn.BatchNorm3d(2, momentum=other)
        self.fc = nn.Linear(64, 6)
        self.bn1d = nn.BatchNorm1d(6, momentum=momentum, affine=False)

    def forward(self, x):
        h = torch.relu(self.bn2d(self.conv(self.bn_in(x))))
        h = self.bn3d(h.reshape(h.shape[0], 2, 2, 4, 4))
        return self.bn1d(self.fc(h.flatten(1)))


def make_pair(momentum, device):
    """(torch model, tritonbn copy) with the same parameters and buffers."""
    ref = Net(momentum).to(device)
    return ref, tritonbn.convert_model(copy.deepcopy(ref))


def make_inputs(n_steps, device, batch=4, channels_last=False):
    xs = [torch.randn(batch, 3, 4, 4, device=device) for _ in range(n_steps)]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    return xs


def train_steps(model, inputs, g, lr=1e-2, autocast=None):
    """One SGD step per input, loss sum(y * g). Returns the outputs and, per step, the
    gradients (before the optimizer step), all cloned. ``autocast``: (device_type, dtype)
    to run forward and loss under torch.autocast, as recommended (backward and optimizer
    step outside: autocast caches the reduced-precision copies of the weights until the
    context exits, so an in-place weight update inside it would not be seen)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs, grads = [], []
    for x in inputs:
        opt.zero_grad(set_to_none=True)
        if autocast is None:
            y = model(x)
            loss = (y.float() * g).sum()
        else:
            with torch.autocast(autocast[0], dtype=autocast[1]):
                y = model(x)
                loss = (y.float() * g).sum()
        loss.backward()
        outs.append(y.detach().clone())
        grads.append({n.removeprefix("_orig_mod."): p.grad.clone()
                      for n, p in model.named_parameters()})
        opt.step()
    return outs, grads


def assert_state_equal(a: nn.Module, b: nn.Module, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        if k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), (k, sa[k], sb[k])
        else:
            torch.testing.assert_close(sa[k], sb[k], **tol, msg=lambda m: f"{k}: {m}")


def assert_grads_close(ga, gb, **tol):
    for step, (a, b) in enumerate(zip(ga, gb)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"step {step} {k}: {m}")


class Recorder:
    """A torch.compile backend that keeps every Dynamo graph and hands it to ``backend``."""

    def __init__(self, backend: str):
        self.backend = lookup_backend(backend)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.backend(gm, example_inputs)

    def op_count(self, graph_index: int, name: str) -> int:
        return sum(1 for n in self.graphs[graph_index].graph.nodes
                   if n.op == "call_function" and name in str(n.target))


@pytest.fixture
def dynamo():
    """A clean Dynamo (caches, recompile counters) before and after the test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def assert_no_graph_break():
    assert not counters["graph_break"], dict(counters["graph_break"])


# Compiled code matches eager up to reassociation by the backend's generated code (on CPU
# they agree exactly; on a GPU Inductor's own reductions, e.g. for bias gradients, differ
# in summation order).
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 matmuls and convolutions in full precision on the GPU: with TF32, tiny
    differences between the compared models would be amplified by its rounding."""
    if not HAS_CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------- torch.compile ------

def _compile_vs_eager(device, backend, momentum, channels_last=False, n_steps=3):
    _, model = make_pair(momentum, device)
    compiled_model = copy.deepcopy(model)
    rec = Recorder(backend)
    compiled = torch.compile(compiled_model, backend=rec, fullgraph=True)
    xs = make_inputs(n_steps, device, channels_last=channels_last)
    g = torch.randn(4, 6, device=device)

    outs_e, grads_e = train_steps(model, xs, g)
    outs_c, grads_c = train_steps(compiled, xs, g)
    for a, b in zip(outs_c, outs_e):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL)
    assert_grads_close(grads_c, grads_e, **TOL)
    assert_state_equal(compiled_model, model, **TOL)
    assert int(model.bn_in.num_batches_tracked) == n_steps

    model.eval()
    compiled_model.eval()
    for x in make_inputs(2, device):
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert_state_equal(compiled_model, model, **TOL)

    assert_no_graph_break()
    assert len(rec.graphs) == 2  # one training graph, one eval graph: no recompilation
    train, evl = 0, 1
    # training: one batch_norm_train per layer, which takes the single-pass kernel where
    # eager does (test_compile_launches_what_eager_launches)
    assert [rec.op_count(train, op) for op in (TRAIN_OP, STATS_OP, APPLY_OP)] == [4, 0, 0]
    assert [rec.op_count(evl, op) for op in (TRAIN_OP, STATS_OP, APPLY_OP)] == [0, 0, 4]
    return rec


@pytest.mark.skipif(not HAS_CUDA and not HAS_CXX, reason="Inductor on CPU needs a C++ compiler")
def test_compile_inductor_matches_eager(device, dynamo):
    """The full check with Inductor (the default backend)."""
    _compile_vs_eager(device, "inductor", momentum=None)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compile_aot_eager_matches_eager(device, dynamo, channels_last):
    """momentum=0.1 here (None in the Inductor test); either way the model has layers in
    both momentum modes (see Net)."""
    _compile_vs_eager(device, "aot_eager", momentum=0.1, channels_last=channels_last)


def test_compile_dynamic_batch(device, dynamo):
    """A new batch size recompiles once with a symbolic batch (the fake implementations
    work with symbolic shapes); later sizes reuse that graph."""
    _, model = make_pair(None, device)
    compiled_model = copy.deepcopy(model)
    rec = Recorder("aot_eager")
    compiled = torch.compile(compiled_model, backend=rec, fullgraph=True)
    for batch in (4, 6, 8):
        x = torch.randn(batch, 3, 4, 4, device=device)
        g = torch.randn(batch, 6, device=device)
        outs_e, grads_e = train_steps(model, [x], g)
        outs_c, grads_c = train_steps(compiled, [x], g)
        torch.testing.assert_close(outs_c[0], outs_e[0], **TOL)
        assert_grads_close(grads_c, grads_e, **TOL)
    assert_state_equal(compiled_model, model, **TOL)
    assert_no_graph_break()
    assert len(rec.graphs) == 2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_launches_what_eager_launches(device, dynamo, kernel_launches, backend):
    """A compiled training step runs the kernels an eager one runs: Net's layers fit the
    single-pass kernel, so one launch per layer forward and one backward, in both."""
    if backend == "inductor" and not HAS_CUDA and not HAS_CXX:
        pytest.skip("Inductor on CPU needs a C++ compiler")
    _, model = make_pair(0.1, device)
    compiled = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True)
    x = make_inputs(1, device)[0]
    launches = []
    for m in (model, compiled, compiled):  # the first compiled step traces and compiles
        kernel_launches.clear()
        m(x).sum().backward()
        launches.append(dict(kernel_launches))
    assert launches[0] == launches[2] == {"bn_fused_kernel": 8}, launches


def test_compile_eager_backend_double_backward(device, dynamo):
    """create_graph=True through a compiled training forward: Dynamo's graph calls
    batch_norm_train, whose backward is chosen when it runs, so the second-order terms
    through BatchNorm are there (backend="eager"; aot_eager and Inductor refuse double
    backward, as they do for torch's BatchNorm)."""
    x0, s0 = make_inputs(1, device)[0], torch.randn(1, 3, 1, 1, device=device)
    bn = tritonbn.BatchNorm2d(3, device=device)

    def second_order(f):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        gx, gs = torch.autograd.grad((f(x, s) ** 3).sum(), (x, s), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gs.square().sum(), s)[0]

    def f(x, s):
        return bn(x) * s

    torch.testing.assert_close(second_order(torch.compile(f, backend="eager")),
                               second_order(f), **TOL)


@pytest.mark.parametrize("momentum", [0.1, 0.0])
def test_compile_functional(device, dynamo, momentum):
    """tritonbn.batch_norm (the functional API) under fullgraph compile, training and eval.
    (momentum=None is a TypeError in the functional API, as in torch: see test_errors.py.)"""
    x = torch.randn(5, 3, 4, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    rm_e, rv_e = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    rm_c, rv_c = rm_e.clone(), rv_e.clone()
    rec = Recorder("aot_eager")
    fn = torch.compile(tritonbn.batch_norm, backend=rec, fullgraph=True)
    for training in (True, False):
        y_e = tritonbn.batch_norm(x, rm_e, rv_e, w, b, training, momentum, 1e-5)
        y_c = fn(x, rm_c, rv_c, w, b, training, momentum, 1e-5)
        torch.testing.assert_close(y_c, y_e, **TOL)
        ge = torch.autograd.grad(y_e.square().sum(), (x, w, b))
        gc = torch.autograd.grad(y_c.square().sum(), (x, w, b))
        for a, e in zip(gc, ge):
            torch.testing.assert_close(a, e, **TOL)
        torch.testing.assert_close(rm_c, rm_e, **TOL)
        torch.testing.assert_close(rv_c, rv_e, **TOL)
    assert_no_graph_break()
    assert rec.op_count(0, TRAIN_OP) == 1


# -------------------------------------------------------------------------- autocast ----

AUTOCAST_CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
]


def _record_bn_dtypes(model):
    """Forward hooks: [(name, input dtype, output dtype)] of every BatchNorm call."""
    log = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(
                lambda mod, inp, out, name=name: log.append((name, inp[0].dtype, out.dtype)))
    return log


# bf16/fp16: the two models round differently upstream of each BN; compare loosely.
AMP_TOL = dict(rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("device_type,dtype", AUTOCAST_CASES)
def test_autocast_matches_torch(device_type, dtype, momentum):
    ref, tb = make_pair(momentum, device_type)
    if device_type == "cpu" and not runs_on_triton(torch.empty(0)):
        pytest.skip("CPU tensors are not run by the kernels here (no Triton interpreter)")
    log_ref, log_tb = _record_bn_dtypes(ref), _record_bn_dtypes(tb)
    xs = make_inputs(2, device_type)
    g = torch.randn(4, 6, device=device_type)
    # small lr: in bf16 a large step would amplify the rounding differences between models
    outs_r, grads_r = train_steps(ref, xs, g, lr=1e-3, autocast=(device_type, dtype))
    outs_t, grads_t = train_steps(tb, xs, g, lr=1e-3, autocast=(device_type, dtype))
    # Same dtypes at every BatchNorm: fp32 in -> fp32 out, reduced in -> reduced out.
    assert log_tb == log_ref
    assert {d for _, d, _ in log_ref} == {torch.float32, dtype}  # both cases exercised
    for a, b in zip(outs_t, outs_r):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **AMP_TOL)
    for gt, gr in zip(grads_t, grads_r):
        # Relative error of each whole gradient, robust to single rounding flips. The
        # biases of conv/fc/bn3d feed a BatchNorm (directly or through a linear layer), so
        # their exact gradient is 0 and what is computed is rounding noise: the error is
        # taken relative to 5% of the largest gradient at least.
        floor = 0.05 * max(v.norm() for v in gr.values())
        for k in gr:
            assert gt[k].dtype == gr[k].dtype == torch.float32, k
            err = (gt[k] - gr[k]).norm() / torch.maximum(gr[k].norm(), floor)
            assert err < 5e-2, (k, err.item())
    for name, buf in tb.named_buffers():
        if "running" in name:
            assert buf.dtype == torch.float32, name
    assert_state_equal(tb, ref, rtol=2e-2, atol=2e-2)

    ref.eval()
    tb.eval()
    log_ref.clear()
    log_tb.clear()
    x = make_inputs(1, device_type)[0]
    with torch.autocast(device_type, dtype=dtype):
        y_r, y_t = ref(x), tb(x)
    assert log_tb == log_ref
    assert y_t.dtype == y_r.dtype == dtype
    torch.testing.assert_close(y_t.float(), y_r.float(), **AMP_TOL)


def test_autocast_compiled_matches_eager(device, dynamo):
    """autocast around a fullgraph-compiled tritonbn model: same dtypes and values as the
    eager tritonbn model under the same autocast."""
    dtype = torch.bfloat16
    _, model = make_pair(None, device)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    xs = make_inputs(2, device)
    g = torch.randn(4, 6, device=device)
    outs_e, grads_e = train_steps(model, xs, g, autocast=(device, dtype))
    outs_c, grads_c = train_steps(compiled, xs, g, autocast=(device, dtype))
    for a, b in zip(outs_c, outs_e):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert_grads_close(grads_c, grads_e, rtol=1e-2, atol=1e-2)
    assert_state_equal(compiled_model, model, rtol=1e-3, atol=1e-3)
    assert_no_graph_break()


# ----------------------------------------------------------- activation checkpointing ----

class Checkpointed(nn.Module):
    """``model`` run under torch.utils.checkpoint: its activations are not kept but
    recomputed in the backward, which runs every layer's training forward again."""

    def __init__(self, model: nn.Module, use_reentrant: bool):
        super().__init__()
        self.model = model
        self.use_reentrant = use_reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.model, x,
                                                 use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_matches_torch(device, use_reentrant):
    """Checkpointed training (video and large-batch models use it to save memory): the
    same outputs and gradients as torch's BatchNorm checkpointed the same way, and the
    recomputation updates the running statistics and num_batches_tracked a second time
    in each step, as it does torch's."""
    ref, ours = make_pair(0.1, device)
    # the reentrant variant gives parameters gradients only for an input that needs one
    xs = [x.requires_grad_() for x in make_inputs(2, device)]
    g = torch.randn(4, 6, device=device)
    outs_r, grads_r = train_steps(Checkpointed(ref, use_reentrant), xs, g)
    outs_o, grads_o = train_steps(Checkpointed(ours, use_reentrant), xs, g)
    for a, b in zip(outs_o, outs_r):
        torch.testing.assert_close(a, b, **TOL)
    assert_grads_close(grads_o, grads_r, **TOL)
    assert_state_equal(ours, ref, **TOL)
    assert int(ours.bn_in.num_batches_tracked) == 2 * len(xs)


# ----------------------------------------------------------------------- CUDA graphs ----

@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_graph_training_step(momentum):
    """Capture forward + backward + SGD step of the converted model once, replay it: the
    running statistics, num_batches_tracked, parameters and the last output and gradients
    equal those of torch's BatchNorm model run eagerly on the same inputs.

    As the CUDA graph docs require: warm-up iterations on a side stream before capture
    (Triton compilation, autotuning when TRITONBN_AUTOTUNE is on, the kernels' lazily
    allocated counter buffer), grads set to None before capture so backward allocates them
    from the graph's pool, a static input tensor refilled before each replay."""
    device = "cuda"
    warmup, replays = 3, 4
    ref, tb = make_pair(momentum, device)
    xs = make_inputs(warmup + replays, device)
    g = torch.randn(4, 6, device=device)

    outs_r, grads_r = train_steps(ref, xs, g)

    opt = torch.optim.SGD(tb.parameters(), lr=1e-2)  # as train_steps
    static_x = torch.empty_like(xs[0])

    def step():
        y = tb(static_x)
        (y.float() * g).sum().backward()
        opt.step()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in xs[:warmup]:
            static_x.copy_(x)
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_y = step()
    # Capture records, it does not run: still `warmup` batches tracked.
    torch.cuda.synchronize()
    assert int(tb.bn_in.num_batches_tracked) == warmup

    for x in xs[warmup:]:
        static_x.copy_(x)
        graph.replay()
    torch.cuda.synchronize()

    assert int(tb.bn_in.num_batches_tracked) == warmup + replays
    # tritonbn vs torch's BatchNorm after 7 SGD steps: equal up to fp32 rounding
    tol = dict(rtol=1e-3, atol=1e-4)
    assert_state_equal(tb, ref, **tol)
    torch.testing.assert_close(static_y, outs_r[-1], **tol)
    for n, p in tb.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[-1][n], **tol)


@pytest.mark.gpu
def test_cuda_graph_eval_forward():
    device = "cuda"
    ref, tb = make_pair(None, device)
    train_steps(ref, make_inputs(2, device), torch.randn(4, 6, device=device))
    tb.load_state_dict(ref.state_dict())
    ref.eval()
    tb.eval()
    xs = make_inputs(3, device)
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            tb(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = tb(static_x)
    for x in xs:
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(static_y, ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_no_host_sync(momentum):
    """Forward + backward with momentum=None too: no synchronising CUDA call (the
    1/num_batches_tracked factor is read on the device)."""
    device = "cuda"
    _, tb = make_pair(momentum, device)
    x = torch.randn(4, 3, 4, 4, device=device)
    g = torch.randn(4, 6, device=device)
    (tb(x) * g).sum().backward()  # warm-up: compile, allocate counters
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (tb(x) * g).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_compile_reduce_overhead(dynamo):
    """torch.compile(mode="reduce-overhead") (Inductor + CUDA graph trees) on a training
    loop: same outputs, gradients and running statistics as eager tritonbn."""
    device = "cuda"
    _, model = make_pair(None, device)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    xs = make_inputs(5, device)
    g = torch.randn(4, 6, device=device)
    outs_e, grads_e = train_steps(model, xs, g)

    opt = torch.optim.SGD(compiled_model.parameters(), lr=1e-2)  # as train_steps
    for x, y_e, gr_e in zip(xs, outs_e, grads_e):
        torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        y = compiled(x)
        (y.float() * g).sum().backward()
        torch.testing.assert_close(y.detach().clone(), y_e, **TOL)
        for n, p in compiled_model.named_parameters():
            torch.testing.assert_close(p.grad.clone(), gr_e[n], **TOL)
        opt.step()
    assert_state_equal(compiled_model, model, **TOL)
    assert_no_graph_break()


# ---------------------------------------------------------------------- torch.export ----

def _trained_pair(device, momentum=None):
    ref, tb = make_pair(momentum, device)
    train_steps(tb, make_inputs(2, device), torch.randn(4, 6, device=device))
    return tb


def _op_targets(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


# The exported program runs the same kernels as the eager model (exact on CPU; on a GPU
# allow for the library picking a different convolution algorithm).
SAME = dict(rtol=1e-5, atol=1e-6)


def test_export_eval(device):
    model = _trained_pair(device).eval()
    x = torch.randn(4, 3, 4, 4, device=device)
    ep = torch.export.export(model, (x,))
    targets = _op_targets(ep)
    assert sum(APPLY_OP in t for t in targets) == 4
    assert not any(STATS_OP in t for t in targets)

    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            torch.testing.assert_close(ep.module()(inp), model(inp), **SAME)
        # core ATen IR: the custom op stays as one opaque node
        decomposed = ep.run_decompositions()
        torch.testing.assert_close(decomposed.module()(x), model(x), **SAME)
        # save / load round trip (the op is resolved by name: tritonbn must be imported)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf)
        torch.testing.assert_close(loaded.module()(x), model(x), **SAME)


def test_export_eval_dynamic_batch(device):
    model = _trained_pair(device).eval()
    x = torch.randn(4, 3, 4, 4, device=device)
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        for n in (2, 7):
            inp = torch.randn(n, 3, 4, 4, device=device)
            torch.testing.assert_close(ep.module()(inp), model(inp), **SAME)


def test_export_training_mode(device):
    """Export in training mode: the exported module updates the running statistics and
    num_batches_tracked like the eager model (momentum=None and float both present)."""
    model = _trained_pair(device)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 4, 4, device=device)
    ep = torch.export.export(copy.deepcopy(model), (x,))
    assert sum(TRAIN_OP in t for t in _op_targets(ep)) == 4
    exported = ep.module()
    for _ in range(2):
        inp = torch.randn_like(x)
        torch.testing.assert_close(exported(inp), eager(inp), **TOL)
    sd_e = eager.state_dict()
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, sd_e[k], **TOL, msg=lambda m: f"{k}: {m}")
    # and the exported training graph can be backpropagated, as the eager model can
    inp = torch.randn_like(x)
    inputs = [inp.clone().requires_grad_() for _ in range(2)]
    for m, inp in zip((exported, eager), inputs):
        m(inp).square().sum().backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, **TOL)
    grads_e = {n: p.grad for n, p in eager.named_parameters()}
    for n, p in exported.named_parameters():
        torch.testing.assert_close(p.grad, grads_e[n], **TOL, msg=lambda m: f"{n}: {m}")


def test_make_fx_training_graph_backpropagates(device):
    """A training forward traced by make_fx holds batch_norm_train, whose gradient is
    registered with it: the graph's gradients are eager tritonbn's."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(4, 3, 5, device=device)
    w, b = torch.randn(3, device=device), torch.randn(3, device=device)

    def fn(x, w, b):
        return tritonbn.batch_norm(x, None, None, w, b, True, relu=True)

    gm = make_fx(fn)(x, w, b)
    assert any(TRAIN_OP in str(n.target) for n in gm.graph.nodes)
    grads = []
    for f in (gm, fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        grads.append(torch.autograd.grad(f(*leaves).square().sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **SAME)


def test_fx_symbolic_trace_keeps_layers_as_calls(device, kernel_launches):
    """fx's default tracer steps into modules outside torch.nn: tritonbn's layers record
    themselves as one call_module node each (with a residual, a two-argument call), so
    symbolic_trace and the fx tools built on it work on converted models, and the traced
    model computes what the model does, with the kernels."""
    ref, model = make_pair(0.1, device)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.bn = model, tritonbn.BatchNorm1d(6, device=device)

        def forward(self, x):
            h = self.net(x)
            return self.bn(h, h)

    block = Residual()
    gm = torch.fx.symbolic_trace(block)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert [c for c in calls if "bn" in c] == ["net.bn_in", "net.bn2d", "net.bn3d",
                                               "net.bn1d", "bn"]
    x = make_inputs(1, device)[0]
    expected = copy.deepcopy(block)(x)
    kernel_launches.clear()
    torch.testing.assert_close(gm(x), expected, **SAME)
    assert kernel_launches


def test_fx_symbolic_trace_refuses_layers_with_hooks(device):
    """fx steps into tritonbn's layers through __call__ (they are not in torch.nn), so a
    forward hook would be traced and then run again by the layer's call: an error that
    says what to do instead of a model that applies its hooks twice."""
    _, model = make_pair(0.1, device)
    model.bn2d.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(RuntimeError, match="forward hooks"):
        torch.fx.symbolic_trace(model)


def test_fx_symbolic_trace_of_uninitialised_lazy_layers(device, kernel_launches):
    """Lazy layers not yet initialised: fx records each as one call, as it records torch's
    (a Proxy has no shape to initialise them from), and the traced model initialises them
    on its first input, into tritonbn's BatchNorm: the same outputs and running statistics
    as torch's traced lazy model, with the kernels. A hook other than the lazy one is
    refused, as on the other layers."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), nn.ReLU(),
                             nn.Flatten(), nn.LazyBatchNorm1d()).to(device)

    ref, model = torch.fx.symbolic_trace(make()), torch.fx.symbolic_trace(
        tritonbn.convert_model(make()))
    assert [n.op for n in model.graph.nodes].count("call_module") == 5
    for x in make_inputs(2, device):
        kernel_launches.clear()
        torch.testing.assert_close(model(x), ref(x), **SAME)
        assert kernel_launches
    assert type(model.get_submodule("1")) is tritonbn.BatchNorm2d
    assert type(model.get_submodule("4")) is tritonbn.BatchNorm1d
    assert_state_equal(model, ref, **SAME)

    hooked = tritonbn.convert_model(make())
    hooked[1].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(RuntimeError, match="forward hooks"):
        torch.fx.symbolic_trace(hooked)

    class ByKeyword(nn.Module):  # the input passed by name
        def __init__(self):
            super().__init__()
            self.bn = tritonbn.LazyBatchNorm1d(device=device)

        def forward(self, x):
            return self.bn(input=x)

    traced = torch.fx.symbolic_trace(ByKeyword())
    x = torch.randn(4, 3, device=device)
    torch.testing.assert_close(traced(x), F.batch_norm(x, None, None, training=True), **SAME)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_records_torch_batch_norm(device, training):
    """torch.jit.trace of a converted model records aten::batch_norm (the kernels'
    launches cannot be traced), and the trace computes what torch's model does."""
    ref, model = make_pair(0.1, device)
    ref.train(training)
    model.train(training)
    x = make_inputs(1, device)[0]
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    assert "aten::batch_norm" in str(traced.inlined_graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), ref(x), **TOL)
