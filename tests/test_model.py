"""chargpt.model: the ladder presets, the gpt parameter count, initial loss, learning, the KV cache, and
checkpoints that do not depend on the kernels backend."""

import math
from dataclasses import replace

import pytest
import torch

import chargpt_kernels
from chargpt import ChargptError
from chargpt.kernel_choice import choose_kernels
from chargpt.model import GPT, ModelConfig, build_model, has_fused_kernel, kernel_dtypes
from chargpt.presets import PRESETS, get_preset
from chargpt_kernels import backends

BACKENDS = chargpt_kernels.available_backends()  # eager always; ext and triton (interpreted on CPU) when they load
# Exact-token generation: backends computing in exact float32 on CPU. Triton is left out: its interpreter is too
# slow for hundreds of launches, and on a GPU its TF32 dots can flip near-tied tokens; its decode path is checked
# against full logits below.
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]
TINY = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def device_for(backend):
    """Triton runs on CUDA tensors when there is a GPU (the tests set TRITON_INTERPRET=1 only without one)."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def tolerance(device):
    return dict(rtol=1e-5, atol=1e-5) if device.type == "cpu" else dict(rtol=2e-3, atol=2e-3)  # TF32 on GPU


def random_batch(config, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(config.vocab_size, (batch, config.block_size), generator=g)
    return x, torch.randint(config.vocab_size, (batch, config.block_size), generator=g)


def test_gpt_parameter_count():
    n = GPT(replace(get_preset("gpt").model, vocab_size=65)).num_params()
    assert 10.6e6 < n < 10.8e6, n  # nanoGPT's shakespeare-char model: 10.65M without the position table


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_and_runs(name):
    preset = get_preset(name)
    config = replace(preset.model, vocab_size=65, block_size=min(preset.model.block_size, 32))
    model = build_model(config)
    x, y = random_batch(config, batch=2)
    logits, loss = model(x, y)
    assert logits.shape == (2, config.block_size, 65) and torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_loss_is_near_uniform(backend):
    config = replace(get_preset("gpt-cpu").model, vocab_size=65, block_size=16, kernels=backend)
    device = device_for(backend)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    with torch.no_grad():
        _, loss = model(*(t.to(device) for t in random_batch(config, batch=2)))
    assert abs(loss.item() - math.log(65)) < 0.1, loss.item()


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; two OpenMP threads on a busy 2-core machine crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_overfits_one_batch(one_thread):
    torch.manual_seed(0)
    model = build_model(TINY)
    x, y = random_batch(TINY, batch=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2, loss.item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_generates_the_same_tokens(one_thread, backend):
    config = replace(TINY, block_size=12, kernels=backend)
    torch.manual_seed(0)
    model = build_model(config).eval()
    prompt = torch.randint(65, (2, 3))
    # 20 new tokens run past block_size, so the sliding-window path is covered too.
    for temperature in (0.0, 1.0):
        cached, recomputed = (model.generate(prompt, 20, temperature, generator=torch.Generator().manual_seed(1),
                                             use_cache=use_cache) for use_cache in (True, False))
        assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decoding_matches_full_logits(backend):
    config = replace(TINY, kernels=backend)
    device = device_for(backend)
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    idx = torch.randint(65, (2, 10), device=device)
    with torch.no_grad(), chargpt_kernels.use_backend(backend):
        full, _ = model(idx)
        logits, cache = model.next_token_logits(idx[:, :6])
        steps = [logits]
        for t in range(6, 10):
            logits, cache = model.next_token_logits(idx[:, t:t + 1], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:10], **tolerance(device))


def test_kv_cache_crop_replays_and_checks_its_length():
    """A cache cropped back to the prompt decodes the same logits again (bench_decode times it so); positions
    written past the crop are overwritten, and a crop outside the filled length is refused."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    idx = torch.randint(65, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        def decode(cache, tokens):
            return torch.stack([model.next_token_logits(tokens[:, t:t + 1], cache)[0]
                                for t in range(tokens.size(1))])
        _, cache = model.next_token_logits(idx[:, :5])
        first = decode(cache, idx[:, 5:])
        cache.crop(5)
        again = decode(cache, idx[:, 5:])
    assert cache.length == 9
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot crop a KV cache of 9 positions to 10"):
        cache.crop(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_load_under_any_backend(backend):
    device = device_for(backend)
    torch.manual_seed(0)
    eager = build_model(replace(TINY, kernels="eager")).to(device)
    other = build_model(replace(TINY, kernels=backend)).to(device)
    assert list(eager.state_dict()) == list(other.state_dict())
    other.load_state_dict(eager.state_dict())
    x, y = (t.to(device) for t in random_batch(TINY))
    with torch.no_grad():
        torch.testing.assert_close(other(x, y)[1], eager(x, y)[1], **tolerance(device))


def test_bigram_generates_in_vocab():
    model = build_model(replace(get_preset("bigram").model, vocab_size=65))
    out = model.generate(torch.zeros((1, 1), dtype=torch.long), 30, top_k=5,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 31) and int(out.max()) < 65


F32 = {"attention": torch.float32, "layer_norm": torch.float32}
BF16_ATTENTION = {"attention": torch.bfloat16, "layer_norm": torch.float32}  # a GPT under CPU bf16 autocast
FP16_ATTENTION = {"attention": torch.float16, "layer_norm": torch.float32}  # ... and under fp16 autocast


def test_choose_kernels():
    assert choose_kernels("eager", "cpu", F32).name == "eager"
    assert choose_kernels("auto", "cpu", F32).name in ("ext", "eager")
    assert choose_kernels("eager", "cpu", BF16_ATTENTION).by_op == {"attention": "eager", "layer_norm": "eager"}
    with pytest.raises(ChargptError, match="unknown chargpt_kernels backend"):
        choose_kernels("fast", "cpu", F32)


def test_fused_stops_when_no_fused_backend(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name: None if name == "eager" else f"{name} is not built")
    assert choose_kernels("auto", "cpu", F32).name == "eager"
    with pytest.raises(ChargptError, match="--fused: no fused kernel backend runs on cpu here .*ext is not built"):
        choose_kernels("auto", "cpu", F32, require_fused=True)
    with pytest.raises(ChargptError, match="'ext' is unavailable: ext is not built"):
        choose_kernels("ext", "cpu", F32)


def require_ext():
    if "ext" not in BACKENDS:
        pytest.skip(f"the ext backend does not load here: {backends.unavailable_reason('ext')}")


def test_auto_runs_eager_the_ops_no_fused_kernel_takes():
    require_ext()  # its CPU attention takes float32 and bfloat16, not float16
    choice = choose_kernels("auto", "cpu", FP16_ATTENTION, require_fused=True)
    assert choice.by_op == {"attention": "eager", "layer_norm": "ext"}
    assert choice.name == "auto"  # so each op picks at call time, as by_op says
    assert choice.note == ("kernels auto: attention runs eager (no fused kernel here takes float16 on cpu yet), "
                           "layer_norm runs ext")
    bf16 = choose_kernels("auto", "cpu", BF16_ATTENTION, require_fused=True)
    assert (bf16.name, bf16.by_op, bf16.note) == ("ext", {"attention": "ext", "layer_norm": "ext"}, None)
    assert choose_kernels("auto", "cpu", F32, require_fused=True) == choose_kernels("ext", "cpu", F32)
    assert choose_kernels("ext", "cpu", F32).note is None
    bigram = choose_kernels("auto", "cpu", {}, require_fused=True)  # no kernels op: the backend auto would use
    assert (bigram.name, bigram.by_op, bigram.note) == ("ext", {}, None)


def test_a_named_backend_that_does_not_take_the_dtype_is_an_error():
    require_ext()
    with pytest.raises(ChargptError, match=r"--kernels ext cannot run this model's attention, which gets float16 "
                                           r"tensors on cpu .*use --kernels auto .* or --dtype float32"):
        choose_kernels("ext", "cpu", FP16_ATTENTION)
    with pytest.raises(ChargptError, match="--fused: no fused kernel here takes .*attention: float16, "
                                           "layer_norm: float64"):
        choose_kernels("auto", "cpu", {"attention": torch.float16, "layer_norm": torch.float64}, require_fused=True)
    # The ext norms take float16 (and bfloat16) on CPU; its attention does not, so only that runs eager.
    half = choose_kernels("auto", "cpu", {"attention": torch.float16, "layer_norm": torch.float16}, require_fused=True)
    assert half.by_op == {"attention": "eager", "layer_norm": "ext"}


@pytest.mark.parametrize("requested", ["eager", "ext", "auto"])
def test_add_norm_is_optional_in_the_choice(requested):
    """A backend without an add_norm kernel is no error (the model takes its plain path), and by_op lists add_norm
    exactly where the model will call it."""
    if requested == "ext":
        require_ext()
    choice = choose_kernels(requested, "cpu", {**F32, "add_norm": torch.float32})
    assert set(choice.by_op) - {"add_norm"} == {"attention", "layer_norm"}
    assert ("add_norm" in choice.by_op) == has_fused_kernel("add_norm", requested, "cpu", torch.float32)
    if requested == "eager":
        assert "add_norm" not in choice.by_op


@pytest.mark.parametrize("use_add_norm", [None, True], ids=["add_norm-by-backend", "add_norm-forced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("switches", [{}, {"residual": False}, {"layernorm": False}, {"arch": "bigram"}],
                         ids=["gpt", "no-residual", "no-layernorm", "bigram"])
def test_kernel_dtypes_are_what_the_ops_get(monkeypatch, dtype, switches, use_add_norm):
    """kernel_dtypes, which a run checks its backend against, matches the dtypes that reach the kernels seam in
    training and in generation under autocast (the LayerNorm of a model without residual paths included). add_norm,
    optional, reaches it where choose_kernels lists it (a fused kernel takes it), or when the model is made to."""
    seen = {}
    implementation = backends.implementation

    def recording(name, op, tensor, *args, **kwargs):
        seen.setdefault(op, set()).add(tensor.dtype)
        return implementation(name, op, tensor, *args, **kwargs)

    monkeypatch.setattr(backends, "implementation", recording)
    config = replace(TINY, dropout=0.1, kernels="auto", **switches)
    model = build_model(config)
    if use_add_norm is not None:
        model.use_add_norm = use_add_norm
    x, y = random_batch(config)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        _, loss = model(x, y)
    loss.backward()
    with autocast:
        model.generate(x[:1, :2], 3)
    expected = kernel_dtypes(config, dtype)
    if "add_norm" in expected and not use_add_norm and "add_norm" not in choose_kernels("auto", "cpu", expected).by_op:
        del expected["add_norm"]
    # linear is no run-level choice (kernel_dtypes leaves it out): it reaches the seam only where a fused kernel
    # takes its tensors, and never refuses a run.
    assert seen.pop("linear", set()) <= {torch.float32}
    assert seen == {op: {dtype} for op, dtype in expected.items()}
