"""The runner's C kernels (specdec.cpu_kernels). The attention computes attention (checked
against a float64 reference), each row from its own key list alone (bitwise, whatever else the
call holds or however it is split among threads); the products compute x @ w.T + b, each row's
outputs bitwise the same at any row count and split; a layer's small steps (norm, rotation, gated
activation) compute what torch's do; and all step aside without a C compiler."""

from __future__ import annotations

import platform

import pytest
import torch

from specdec import cpu_kernels
from specdec.cpu_kernels import KeyLists, PackedWeight


@pytest.fixture(scope="module")
def kernels(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("SPECDEC_CACHE_DIR", str(tmp_path_factory.mktemp("kernel-cache")))
    kernels = cpu_kernels.load()
    assert kernels is not None, "this machine has a C compiler: the kernels must build"
    return kernels


@pytest.fixture(scope="module")
def kernel(kernels):
    return kernels.attention


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _cache(kv_heads: int, capacity: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(kv_heads, capacity, dim, generator=generator),
            torch.randn(kv_heads, capacity, dim, generator=generator))


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: list[list[int]],
               scale: float) -> torch.Tensor:
    """Softmax attention in float64, row r over the keys at slots[r]."""
    heads, kv_heads = q.shape[1], keys.shape[0]
    out = []
    for row, row_slots in enumerate(slots):
        k = keys[:, row_slots].double().repeat_interleave(heads // kv_heads, 0)
        v = values[:, row_slots].double().repeat_interleave(heads // kv_heads, 0)
        weights = (torch.einsum("hd,hkd->hk", q[row].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hk,hkd->hd", weights, v))
    return torch.stack(out).float()


@pytest.mark.parametrize("dim", [8, 24, 64, 72])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (6, 1)])
def test_it_computes_attention_over_each_rows_keys(kernel, dim, heads, kv_heads):
    keys, values = _cache(kv_heads, 128, dim, seed=dim)
    # causal rows at slots 90..96 (key counts not multiples of 8), and tree-like rows: a prefix, then slots past it
    prefix = [91, 92, 93, 97, 1, 85, 85]
    extra = [[], [], [], [], [], [101, 104], [101, 102, 103, 110]]
    q = torch.randn(len(prefix), heads, dim, generator=torch.Generator().manual_seed(1))
    out = kernel.attend(q, keys, values, KeyLists(prefix, extra), dim**-0.5)
    slots = [list(range(p)) + e for p, e in zip(prefix, extra)]
    torch.testing.assert_close(out, _reference(q, keys, values, slots, dim**-0.5), rtol=1e-5, atol=1e-5)


def test_a_row_is_bitwise_the_same_alone_in_company_and_split_among_threads(kernel):
    assert kernel.openmp, "gcc builds the kernel with OpenMP: long calls must be able to split"
    dim, heads, kv_heads = 64, 9, 3
    keys, values = _cache(kv_heads, 1024, dim, seed=5)
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(300, heads, dim, generator=generator)
    prefix = torch.randint(1, 1000, (300,), generator=generator).tolist()
    extra = [[] for _ in prefix]
    extra[7] = [1001, 1003]  # a tree node: its own keys after a prefix
    lists = KeyLists(prefix, extra)
    try:
        kernel.threads = 1
        one_thread = kernel.attend(q, keys, values, lists, 0.125)
        for threads in (2, 3, 5):  # rows split among threads, and a lone row's kv heads
            kernel.threads = threads
            assert torch.equal(kernel.attend(q, keys, values, lists, 0.125), one_thread)
            for row in (0, 7, 150, 299):
                alone = kernel.attend(q[row : row + 1], keys, values, KeyLists([prefix[row]], [extra[row]]), 0.125)
                assert torch.equal(alone[0], one_thread[row])
    finally:
        kernel.threads = 0


def test_a_tree_node_reading_its_ancestors_equals_the_chain_of_them(kernel):
    """A node off a tree's leading chain reads the slots before the tree, then its ancestors'
    slots wherever they sit: bitwise what the chain of those tokens, laid out in order, computes."""
    dim, heads, kv_heads = 64, 9, 3
    keys, values = _cache(kv_heads, 256, dim, seed=8)
    q = torch.randn(1, heads, dim, generator=torch.Generator().manual_seed(9))
    path = [200, 203, 207]  # the tree's slots of the node's ancestors and itself
    chained_keys, chained_values = keys.clone(), values.clone()
    chained_keys[:, 200:203], chained_values[:, 200:203] = keys[:, path], values[:, path]
    as_node = kernel.attend(q, keys, values, KeyLists([200], [path]), 0.125)
    as_chain = kernel.attend(q, chained_keys, chained_values, KeyLists([203], [[]]), 0.125)
    assert torch.equal(as_node, as_chain)


@pytest.mark.parametrize("outs,inputs", [(96, 64), (100, 37), (5, 576), (1000, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_product_computes_x_times_w_transposed_plus_b(kernels, outs, inputs, bias):
    generator = torch.Generator().manual_seed(outs + inputs)
    weight = torch.randn(outs, inputs, generator=generator)
    b = torch.randn(outs, generator=generator) if bias else None
    x = torch.randn(30, inputs, generator=generator)
    reference = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    torch.testing.assert_close(kernels.linear(x, PackedWeight.of(weight), b), reference.float(), rtol=1e-5,
                               atol=1e-5)


def test_a_rows_products_are_bitwise_the_same_at_any_row_count_and_split_among_threads(kernels):
    """A row's outputs do not depend on the other rows of the call (more rows than a tile holds in
    registers, and than a block of rows the tiles pass over in turn), its place among them, or the
    threads."""
    assert kernels.linear.openmp
    generator = torch.Generator().manual_seed(11)
    weight, bias = torch.randn(1000, 576, generator=generator), torch.randn(1000, generator=generator)
    packed = PackedWeight.of(weight)
    x = torch.randn(200, 576, generator=generator)
    linear = kernels.linear
    try:
        linear.threads = 1
        one_thread = linear(x, packed, bias)
        for threads in (2, 3, 7):
            linear.threads = threads
            assert torch.equal(linear(x, packed, bias), one_thread)
            for rows in (slice(0, 1), slice(5, 6), slice(3, 16), slice(13, 29), slice(90, 110), slice(199, 200)):
                assert torch.equal(linear(x[rows], packed, bias), one_thread[rows])
    finally:
        linear.threads = 0


def test_the_products_are_built_for_this_cpus_widest_vectors(kernels):
    """AVX-512 CPUs compute sixteen floats a vector and hold 12 rows' sums in their 32 registers;
    others eight, and 4 rows in AVX2's 16 (sixteen-lane code compiled for AVX2 spilled its sums
    to memory: a step 3-5x slower)."""
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    if "avx2" not in flags:
        pytest.skip("an x86 CPU with AVX2 is what this checks")
    wide = "avx512f" in flags
    assert (kernels.linear.lanes, kernels.linear.rows_a_pass) == ((16, 12) if wide else (8, 6))


def test_a_products_residual_is_added_after_its_bias(kernels):
    generator = torch.Generator().manual_seed(12)
    weight, bias = torch.randn(70, 48, generator=generator), torch.randn(70, generator=generator)
    x, residual = torch.randn(5, 48, generator=generator), torch.randn(5, 70, generator=generator)
    packed = PackedWeight.of(weight)
    assert torch.equal(kernels.linear(x, packed, bias, residual), residual + kernels.linear(x, packed, bias))


@pytest.mark.parametrize("dim", [64, 576, 37])
def test_the_rms_norm_is_llamas_and_each_row_its_own(kernels, dim):
    from specdec.runner import rms_norm

    generator = torch.Generator().manual_seed(dim)
    x, weight = torch.randn(9, dim, generator=generator) * 3, torch.randn(dim, generator=generator)
    out = kernels.layer.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(out, rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.layer.rms_norm(x[4:5], weight, 1e-5), out[4:5])


def test_the_rotation_is_hugging_faces_on_queries_and_keys_in_place(kernels):
    from specdec.runner import _rotate_half

    generator = torch.Generator().manual_seed(13)
    heads, kv_heads, dim, rows = 9, 3, 64, 6
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=generator)
    angles = torch.rand(rows, dim // 2, generator=generator) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated = qkv.clone()
    kernels.layer.rotate(rotated, heads + kv_heads, dim, cos, sin)
    heads_of = lambda t: t[:, : (heads + kv_heads) * dim].reshape(rows, heads + kv_heads, dim)  # noqa: E731
    expected = heads_of(qkv) * cos[:, None] + _rotate_half(heads_of(qkv)) * sin[:, None]
    torch.testing.assert_close(heads_of(rotated), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rotated[:, (heads + kv_heads) * dim :], qkv[:, (heads + kv_heads) * dim :])  # values untouched
    with pytest.raises(ValueError, match="cannot rotate"):
        kernels.layer.rotate(qkv[:, ::2], 2, dim, cos, sin)
    with pytest.raises(ValueError, match="cannot rotate"):
        kernels.layer.rotate(qkv, heads + kv_heads, dim, cos[:3], sin[:3])  # fewer rows of angles than rows


@pytest.mark.parametrize("inner", [1536, 21])
def test_the_gated_activation_is_silu_of_gate_times_up(kernels, inner):
    generator = torch.Generator().manual_seed(inner)
    gate_up = torch.randn(7, 2 * inner, generator=generator) * 8  # large gates of both signs
    gate, up = gate_up.chunk(2, dim=-1)
    out = kernels.layer.silu_mul(gate_up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.layer.silu_mul(gate_up[2:3]), out[2:3])


def test_a_product_on_half_weights_is_bitwise_the_float32_product_of_the_same_weights(kernels):
    """The feature drafter's float16 weights: each is widened exactly as it is read, and the sums
    run as float32's do, so the outputs equal the float32 product of the widened weights bit for
    bit, at every row count (tiles of 1 to 12 rows, a block of rows and more) and split."""
    if not kernels.linear.half:
        pytest.skip("this CPU converts no half precision (neither AVX-512 nor F16C)")
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(1000, 576, generator=generator).half()
    bias, x = torch.randn(1000, generator=generator), torch.randn(110, 576, generator=generator)
    residual = torch.randn(110, 1000, generator=generator)
    half, wide = PackedWeight.of(weight), PackedWeight.of(weight.float())
    assert half.data.dtype == torch.float16 and half.data.nbytes * 2 == wide.data.nbytes
    for rows in (1, 2, 5, 12, 13, 110):
        assert torch.equal(kernels.linear(x[:rows], half, bias, residual[:rows]),
                           kernels.linear(x[:rows], wide, bias, residual[:rows]))
    torch.testing.assert_close(kernels.linear(x, half), torch.nn.functional.linear(x, weight.float()),
                               rtol=1e-4, atol=1e-4)
    assert kernels.linear.computes(torch.float16) and not kernels.linear.computes(torch.bfloat16)
    with pytest.raises(ValueError, match="do not match"):
        kernels.linear(x, PackedWeight.of(weight.bfloat16()))


def test_the_product_refuses_shapes_that_do_not_match(kernels):
    packed = PackedWeight.of(torch.randn(40, 16))
    with pytest.raises(ValueError, match="do not match"):
        kernels.linear(torch.randn(2, 17), packed)
    with pytest.raises(ValueError, match="do not match"):
        kernels.linear(torch.randn(2, 16), packed, torch.randn(39))
    with pytest.raises(ValueError, match="do not match"):
        kernels.linear(torch.randn(2, 16, dtype=torch.float64), packed)


def test_without_a_c_compiler_the_runner_keeps_torch_attention_and_onednn_products(monkeypatch, tmp_path,
                                                                                   tiny_target):
    from specdec import models
    from specdec.runner import ModelRunner

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert cpu_kernels.load() is None
    model = models.load_model(str(tiny_target))
    runner = ModelRunner(model, model.config.vocab_size)
    assert runner.c_attention is None and runner.products == "onednn"
    assert not list(tmp_path.glob("*.so"))


def test_keys_laid_out_otherwise_are_refused_not_misread(kernel):
    keys, values = _cache(2, 64, 8, seed=3)
    q = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.attend(q, keys.transpose(0, 1).contiguous().transpose(0, 1), values, KeyLists([5], [[]]), 0.5)


def test_the_services_choose_their_kernels_and_c_refuses_to_start_without_them(tiny_target, monkeypatch, tmp_path):
    from specdec.service_base import load_causal_lm
    from specdec.serving import StartupError

    load = lambda setting: load_causal_lm(str(tiny_target), "target", "cpu", "float32",  # noqa: E731
                                          cpu_kernels=setting).runner
    assert load("auto").c_attention is not None and load("auto").products == "c"
    assert load("torch").c_attention is None and load("torch").products == "onednn"
    with pytest.raises(StartupError, match="'c', 'torch' or 'auto'"):
        load("fast")
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert load("auto").c_attention is None  # falls back, with a warning
    with pytest.raises(StartupError, match="did not build"):
        load("c")


def test_a_compiler_without_openmp_builds_one_thread_kernels_once(monkeypatch, tmp_path):
    """Where the OpenMP build fails the kernels are built without it (calls on one thread, the same
    numbers), and later starts load that build instead of trying OpenMP again."""
    tried = tmp_path / "openmp-tries"
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text(f'#!/bin/sh\ncase "$*" in *-fopenmp*) echo x >> {tried}; exit 1;; esac\nexec gcc "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    first = cpu_kernels.load()
    assert first is not None and not first.openmp
    assert cpu_kernels.load() is not None
    assert tried.read_text().count("x") == 1
    keys, values = _cache(3, 64, 16, seed=2)
    q = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(4))
    lists = KeyLists([40, 60], [[], []])
    torch.testing.assert_close(first.attention.attend(q, keys, values, lists, 0.25),
                               _reference(q, keys, values, [list(range(40)), list(range(60))], 0.25),
                               rtol=1e-5, atol=1e-5)
    weight, x = torch.randn(300, 64), torch.randn(20, 64)
    torch.testing.assert_close(first.linear(x, PackedWeight.of(weight)), torch.nn.functional.linear(x, weight),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("c_kernels", [True, False])
def test_the_runner_computes_each_supported_layout_as_hugging_face_does(model_type, c_kernels):
    """Qwen2's biases and Qwen3's q and k norms go through the C steps too (or their torch
    fallback): the runner's logits match Hugging Face's forward, and so does its greedy choice."""
    import transformers

    from specdec.kv_cache import SessionCache
    from specdec.runner import ForwardJob, ModelRunner

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "qwen3": transformers.Qwen3Config}[model_type]
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          use_sliding_window=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    runner = ModelRunner(model, 300, c_products=c_kernels, c_attention=c_kernels)
    assert runner.products == ("c" if c_kernels else "onednn")
    tokens = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = runner.forward([ForwardJob(SessionCache(), tokens, 0)])[0].logits
    with torch.inference_mode():
        theirs = model(input_ids=torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def _ggml(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """`weight` through GGML's own quantizer and dequantizer (the gguf package's, which transformers
    loads .gguf files with): the float32 numbers a .gguf model in that format has once loaded."""
    import gguf

    quant = getattr(gguf.GGMLQuantizationType, kind)
    data = gguf.quants.quantize(weight.numpy(), quant)
    return torch.from_numpy(gguf.quants.dequantize(data, quant).astype("float32")).reshape(weight.shape)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_weights_dequantized_from_ggml_blocks_are_found_back_exactly_and_others_are_not(kind):
    from specdec import ggml_blocks

    generator = torch.Generator().manual_seed(21)
    raw = torch.randn(70, 96, generator=generator) * 0.05
    raw[3, 32:64] = 0.25  # a constant block (a zero scale)
    weight = _ggml(raw, kind)
    found = ggml_blocks.factor(weight)
    assert found is not None and found.format == kind.lower()
    assert torch.equal(found.dequantized().view(torch.int32), weight.view(torch.int32))
    assert ggml_blocks.factor(raw) is None  # plain float32 weights stay float32
    nudged = weight.clone()
    nudged[5, 7] = torch.nextafter(nudged[5, 7], torch.tensor(1.0))  # one weight one bit off its grid
    assert ggml_blocks.factor(nudged) is None
    assert ggml_blocks.factor(weight[:, :80]) is None  # inputs not a whole number of blocks
    assert ggml_blocks.factor(weight.half()) is None


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_weights_rounded_into_ggml_blocks_are_as_close_as_ggmls_and_read_back_as_those_blocks(kind):
    """ggml_blocks.quantized (the feature drafter's weights): each weight within half a step of its
    block (plus the float16 rounding of Q4_1's offset), as close on average as GGML's own quantizer
    gets (a floor instead of the nearest code fails that), and the numbers found back as the
    same blocks by factor, so the C product reads them in blocks."""
    from specdec import ggml_blocks

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(70, 96, generator=generator) * 0.05
    weight[3, 32:64] = 0.25  # a constant block
    weight[4, :32] = 0.0  # a block of zeros (a zero scale)
    blocks = ggml_blocks.quantized(weight, kind)
    rounded = blocks.dequantized()
    assert blocks.format == kind and torch.isfinite(rounded).all()
    step = blocks.scale.float().repeat_interleave(ggml_blocks.BLOCK, dim=1)
    assert ((rounded - weight).abs() <= step / 2 + weight.abs().amax() * 2**-10).all()
    ours, ggmls = (rounded - weight).abs().mean(), (_ggml(weight, kind.upper()) - weight).abs().mean()
    assert ours <= 1.05 * ggmls
    found = ggml_blocks.factor(rounded)
    assert found is not None and found.format == kind and torch.equal(found.dequantized(), rounded)
    with pytest.raises(ValueError, match="not a GGML block format"):
        ggml_blocks.quantized(weight, "q5_0")
    with pytest.raises(ValueError, match="blocks of 32"):
        ggml_blocks.quantized(weight[:, :80], kind)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("outs,inputs", [(1000, 576), (100, 64)])
def test_a_product_on_ggml_blocks_is_bitwise_the_product_on_their_float32_weights(kernels, kind, outs, inputs):
    """Each weight widened back in registers to the float32 number GGML's dequantization gives and
    summed in the same order: the same bits at every row count (tiles of 1 to 12 rows, the blocks
    widened once a tile for more, a block of rows and more), with bias and residual, and split
    among threads; a sixth (Q4_1) or a quarter (Q8_0) of the float32 packing's bytes or less."""
    if not kernels.linear.half:
        pytest.skip("this CPU converts no half precision (neither AVX-512 nor F16C)")
    generator = torch.Generator().manual_seed(outs + inputs)
    weight = _ggml(torch.randn(outs, inputs, generator=generator) * 0.05, kind)
    bias, x = torch.randn(outs, generator=generator), torch.randn(110, inputs, generator=generator)
    residual = torch.randn(110, outs, generator=generator)
    blocks, wide = kernels.linear.pack(weight), PackedWeight.of(weight)
    assert blocks.blocks == kind.lower() and blocks.shape == wide.shape == (outs, inputs)
    assert blocks.data.nbytes * (6 if kind == "Q4_1" else 3.5) < wide.data.nbytes
    linear = kernels.linear
    try:
        for threads in (1, 2, 3):
            linear.threads = threads
            for rows in (1, 2, 5, 8, 12, 13, 40, 110):
                assert torch.equal(linear(x[:rows], blocks, bias, residual[:rows]),
                                   linear(x[:rows], wide, bias, residual[:rows]))
    finally:
        linear.threads = 0
    assert kernels.linear.pack(weight, blocks=False).blocks is None
    with pytest.raises(ValueError, match="do not match"):
        kernels.linear(torch.randn(2, inputs + 1), blocks)


def test_the_runner_packs_a_gguf_models_weights_back_into_their_blocks_with_the_same_logits(kernels):
    """A model whose weights came from Q4_1 (its layers) and Q8_0 (its embedding and head), as the
    default target's do: the runner's products run on the blocks, and its logits, a prompt and a
    verify of several rows, are bitwise those of the runner on float32 weights."""
    if not kernels.linear.half:
        pytest.skip("this CPU converts no half precision (neither AVX-512 nor F16C)")
    import transformers

    from specdec.kv_cache import SessionCache
    from specdec.runner import ForwardJob, ModelRunner

    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.copy_(_ggml(parameter, "Q8_0" if "embed" in name else "Q4_1"))
    blocks, wide = ModelRunner(model, 320), ModelRunner(model, 320, c_blocks=False)
    assert {layer.gate_up.blocks for layer in blocks.layers} == {"q4_1"} and blocks.head_weight.blocks == "q8_0"
    assert blocks.weight_formats == {"q4_1": 8, "q8_0": 1} and wide.weight_formats == {"float32": 9}
    tokens = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(1)).tolist()

    def prompt_then_verify(runner: ModelRunner) -> list[torch.Tensor]:
        entry = SessionCache()
        return [runner.forward([ForwardJob(entry, tokens[:40], 0)])[0].logits,
                runner.forward([ForwardJob(entry, tokens, 40)])[0].logits]

    for ours, theirs in zip(prompt_then_verify(blocks), prompt_then_verify(wide)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("gguf, c_attention", [(False, True), (True, True), (False, False)])
def test_a_layers_halves_in_one_call_each_give_the_bits_of_its_calls_one_by_one(kernels, gguf, c_attention):
    """The runner's default makes a layer's halves around its attention one C call each
    (FusedLayer), and its attention writes the new keys and values itself (attend_projected): a
    prompt's and a verify's logits and features, for two sessions in one pass, one verifying a
    tree, are bitwise those of the layer's products and small steps called one by one (biases on
    every product, float32 weights or, where this CPU computes them, GGML blocks; and with the
    torch attention blocks, between the two calls, instead of the C attention)."""
    import transformers

    from specdec.kv_cache import SessionCache
    from specdec.runner import ForwardJob, ModelRunner

    if gguf and not kernels.linear.half:
        pytest.skip("this CPU converts no half precision (neither AVX-512 nor F16C)")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if gguf and parameter.dim() == 2:
                parameter.copy_(_ggml(parameter, "Q8_0" if "embed" in name or "lm_head" in name else "Q4_1"))
            elif parameter.dim() == 1 and "norm" not in name:
                parameter.normal_()  # biases that matter
    fused = ModelRunner(model, 320, c_attention=c_attention)
    calls = ModelRunner(model, 320, c_attention=c_attention, c_layers=False)
    assert (fused.c_attention is not None) == c_attention
    assert fused.fused_layers is not None and calls.fused_layers is None
    assert (fused.weight_formats == {"q4_1": 8, "q8_0": 1}) if gguf else (fused.weight_formats == {"float32": 9})
    tokens = torch.randint(0, 320, (2, 50), generator=torch.Generator().manual_seed(1)).tolist()

    def prompts_then_verifies(runner: ModelRunner) -> list[torch.Tensor]:
        entries = [SessionCache(), SessionCache()]
        prompts = runner.forward([ForwardJob(entries[0], tokens[0][:40], 0, (1, 2)),
                                  ForwardJob(entries[1], tokens[1][:33], 0, (1, 2))])
        verifies = runner.forward([ForwardJob(entries[0], tokens[0], 40, (1,)),  # a chain, and a tree of 6
                                   ForwardJob(entries[1], tokens[1][:40], 33, tree=[-1, 0, 1, -1, 3, 0])])
        return [t for result in prompts + verifies for t in (result.logits, result.features) if t is not None]

    for ours, theirs in zip(prompts_then_verifies(fused), prompts_then_verifies(calls), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("gguf", [False, True])
def test_a_pass_through_every_layer_in_one_call_gives_the_bits_of_a_call_per_layer(kernels, gguf):
    """A pass runs every layer in one C call (FusedLayers): one session's prompt, chain and tree
    and two sessions' rows in one pass give the logits, the features (the embeddings, a middle
    layer's, the last layer's) and the keys and values in the caches, bit for bit, of the layers
    called one at a time; spans that do not fit their cache or rows, and taps of the wrong shape,
    are refused."""
    import transformers

    from specdec.cpu_kernels import FusedLayers, KeyLists, PassSpan
    from specdec.kv_cache import SessionCache
    from specdec.runner import ForwardJob, ModelRunner

    if gguf and not kernels.linear.half:
        pytest.skip("this CPU converts no half precision (neither AVX-512 nor F16C)")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256)
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if gguf:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() == 2:
                    parameter.copy_(_ggml(parameter, "Q8_0" if "embed" in name or "lm_head" in name else "Q4_1"))
    one_call = ModelRunner(model, 320)
    per_layer = ModelRunner(model, 320, c_pass=False)
    assert one_call.layers_pass is not None and per_layer.layers_pass is None
    tokens = torch.randint(0, 320, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    calls = []

    def passes(runner: ModelRunner) -> list[torch.Tensor]:
        entry, other = SessionCache(), SessionCache()
        results = [runner.forward([ForwardJob(entry, tokens[:40], 0, (0, 2, 3))]),
                   runner.forward([ForwardJob(entry, tokens[:46], 40, (0, 2, 3))]),  # a chain of 5
                   runner.forward([ForwardJob(entry, tokens[:52], 45, (0, 2, 3), tree=[-1, 0, 1, -1, 3, 0])]),
                   runner.forward([ForwardJob(entry, tokens[:50], 47, (2,)),  # two sessions, the second a tree
                                   ForwardJob(other, tokens[5:30], 21, (2,), tree=[-1, 0, -1])])]
        kept = [cache.kv.span(0, cache.kv.length).clone() for cache in (entry, other)]
        return [t for batch in results for r in batch for t in (r.logits, r.features) if t is not None] + kept

    original = FusedLayers.forward

    def counted(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    FusedLayers.forward = counted
    try:
        ours = passes(one_call)
    finally:
        FusedLayers.forward = original
    assert calls[:3] == [40, 6, 7] and len(calls) == 4 and calls[3] > 25  # one call a pass
    for mine, theirs in zip(ours, passes(per_layer), strict=True):
        assert torch.equal(mine, theirs)
    layers, x, cos = one_call.layers_pass, torch.zeros(2, 64), torch.ones(2, 16)
    lists = KeyLists([1, 2], [[], []])
    cache = torch.zeros(3, 2, 2, 8, 16)
    for spans, taps in (([PassSpan(cache[:, :, :, :4], 0, lists)], {}),  # not contiguous
                        ([PassSpan(cache, 7, lists)], {}),  # past its capacity
                        ([PassSpan(cache, 0, KeyLists([1], [[]]))], {}),  # fewer rows than the pass has
                        ([PassSpan(torch.zeros(2, 2, 2, 8, 16), 0, lists)], {}),  # another model's cache
                        ([PassSpan(cache, 0, lists)], {3: torch.zeros(2, 64)})):  # no layer 3
        with pytest.raises(ValueError, match="a pass of rows"):
            layers.forward(x, cos, cos, spans, 0.25, taps)


@pytest.mark.skipif(platform.machine() != "x86_64" or not cpu_kernels.c_compiler(),
                    reason="builds for a baseline x86-64 CPU")
def test_the_kernels_build_and_compute_for_a_cpu_without_vector_extensions(tmp_path):
    """Built for a baseline x86-64 CPU (no AVX-512, AVX2 or F16C: GCC's generic vectors), as on a
    host the build did not test: the library loads with no symbol missing (a helper defined only
    under the half kernel's #if once left one undefined, and the runner silently fell back to
    torch), computes no half or block kernel, and its float32 product is x @ w.T."""
    import ctypes

    library = tmp_path / "baseline.so"
    flags = tuple(flag for flag in cpu_kernels.FLAGS if not flag.startswith("-march")) + ("-march=x86-64",)
    cpu_kernels.build(cpu_kernels.c_compiler(), flags + cpu_kernels.OPENMP, library)
    linear = cpu_kernels.CpuLinear(ctypes.CDLL(str(library)))  # (ctypes binds every symbol at load)
    assert not linear.half and linear.lanes == 8
    generator = torch.Generator().manual_seed(5)
    weight, x = torch.randn(70, 64, generator=generator), torch.randn(3, 64, generator=generator)
    torch.testing.assert_close(linear(x, linear.pack(weight)), x @ weight.T, rtol=1e-5, atol=1e-5)
