"""The one capture loop against a dense torch reference, and the one held-out rule:
whole batches, every ``VAL_EVERY``-th, for the Gram and the raw-row captures alike."""

import pytest
import torch
from torch import nn

from lyoncompress.capture import capture_inputs, capture_rows, forward_order, recorded_inputs
from lyoncompress.data import VAL_EVERY, held_out, split_batches
from lyoncompress.errors import InputError

F64 = torch.float64


class _Tokens(nn.Module):
    """Takes a tokenizer-style mapping and runs two linear layers on ``(batch, seq, n)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 9, dtype=F64)
        self.down = nn.Linear(9, 4, dtype=F64)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(input_ids)))


def _text_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """Batches of 3 samples, 5 positions each, some of them padding."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        lengths = torch.randint(1, 6, (3, 1), generator=generator)
        mask = (torch.arange(5) < lengths).long()  # (3, 5)
        ids = torch.randn(3, 5, 6, generator=generator, dtype=F64)  # (batch, seq, n)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _reference_rows(model: _Tokens, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every real token's input to each layer, computed without hooks (float64
    throughout, so only summation order separates it from the capture)."""
    x = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])  # (tokens, 6)
    with torch.no_grad():
        hidden = torch.relu(model.up(x))  # (tokens, 9)
    return {"up": x, "down": hidden}


def test_held_out_rule_has_the_documented_period():
    assert VAL_EVERY == 4
    assert [i for i in range(12) if held_out(i)] == [3, 7, 11]
    assert [i for i in range(7) if held_out(i, 3)] == [2, 5]
    fit, judge = split_batches(list(range(10)))
    assert (fit, judge) == ([0, 1, 2, 4, 5, 6, 8, 9], [3, 7])


@pytest.mark.parametrize("val_every", [2, 3, VAL_EVERY])
def test_capture_inputs_vs_dense_grams(val_every):
    torch.manual_seed(0)
    model = _Tokens()
    batches = _text_batches(9)
    calib = capture_inputs(model, ["up", "down"], batches, max_samples=10_000, val_every=val_every)
    fit, judge = split_batches(batches, val_every)
    for name in ("up", "down"):
        train, val = _reference_rows(model, fit)[name], _reference_rows(model, judge)[name]
        torch.testing.assert_close(calib[name].gram_train, train.T @ train, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(calib[name].gram_val, val.T @ val, rtol=1e-12, atol=1e-12)
        assert (calib[name].rows_train, calib[name].rows_val) == (len(train), len(val))
        assert calib[name].gram_train.dtype == F64


@pytest.mark.parametrize("val_every", [2, 3, VAL_EVERY])
def test_capture_rows_vs_dense_rows(val_every):
    torch.manual_seed(0)
    model = _Tokens()
    batches = _text_batches(9)
    captured = capture_rows(model, ["up", "down"], batches, max_rows=10_000, val_every=val_every)
    fit, judge = split_batches(batches, val_every)
    for name in ("up", "down"):
        train, val = _reference_rows(model, fit)[name], _reference_rows(model, judge)[name]
        # the same rows in the same order, whole batches only
        torch.testing.assert_close(captured[name].train, train, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(captured[name].gram_val, val.T @ val, rtol=1e-12, atol=1e-12)
        assert captured[name].rows_val == len(val)


def test_gram_and_row_captures_agree_and_stop_at_the_row_cap():
    torch.manual_seed(0)
    model = _Tokens()
    batches = _text_batches(16)
    grams = capture_inputs(model, ["up"], batches, max_samples=7)["up"]
    rows = capture_rows(model, ["up"], batches, max_rows=7)["up"]
    assert rows.train.shape == (7, 6) and grams.rows_train == 7 and grams.rows_val == rows.rows_val == 7
    assert torch.equal(grams.gram_train, rows.train.T @ rows.train)
    assert torch.equal(grams.gram_val, rows.gram_val)


def test_capture_rejects_a_period_without_training_batches_and_unknown_layers():
    model = _Tokens()
    with pytest.raises(InputError, match="val_every"):
        capture_rows(model, ["up"], _text_batches(2), max_rows=10, val_every=1)
    with pytest.raises(InputError, match="linear layer"):
        capture_rows(model, ["nope"], _text_batches(2), max_rows=10)


def test_recorded_inputs_and_forward_order_vs_a_plain_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(2, 4, 5)  # (batch, seq, n)
    with recorded_inputs(model, ["2", "0"]) as captured, torch.no_grad():
        model(x)
    assert torch.equal(captured["0"][0], x.reshape(-1, 5))
    with torch.no_grad():
        assert torch.equal(captured["2"][0], torch.tanh(model[0](x)).reshape(-1, 3))
    assert forward_order(model, ["2", "0"], x) == ["0", "2"]
    assert not model[0]._forward_pre_hooks  # every hook removed


class _Shared(nn.Module):
    """``a`` and ``b`` take the same tensor (as a Llama's q/k/v_proj do), ``c`` its own;
    in batches whose first value is above ``split_above``, ``b`` gets a shifted copy."""

    def __init__(self, split_above: float | None = None) -> None:
        super().__init__()
        self.a, self.b, self.c = (
            nn.Linear(6, 3, dtype=F64),
            nn.Linear(6, 3, dtype=F64),
            nn.Linear(3, 2, dtype=F64),
        )
        self.split_above = split_above

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        split = self.split_above is not None and float(input_ids[0, 0, 0]) > self.split_above
        return self.c(self.a(input_ids) + self.b(input_ids + 1 if split else input_ids))


@pytest.mark.parametrize("split", [False, True])
def test_layers_fed_one_tensor_share_their_moments_only_while_they_are(split):
    torch.manual_seed(0)
    batches = _text_batches(9)
    first = float(batches[0]["input_ids"][0, 0, 0])
    assert any(float(b["input_ids"][0, 0, 0]) > first for b in batches)  # some later batch splits
    model = _Shared(first if split else None)
    calib = capture_inputs(model, ["a", "b", "c"], batches, max_samples=10_000)
    fit, judge = split_batches(batches)
    for name in ("a", "b", "c"):
        alone = capture_inputs(model, [name], batches, max_samples=10_000)[name]
        assert torch.equal(calib[name].gram_train, alone.gram_train)
        assert torch.equal(calib[name].gram_val, alone.gram_val)
        assert (calib[name].rows_train, calib[name].rows_val) == (alone.rows_train, alone.rows_val)
    x = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in fit])
    torch.testing.assert_close(calib["a"].gram_train, x.T @ x, rtol=1e-12, atol=1e-12)
    # one set of moments for a and b while b's input is a's, else b's own (its shifted rows)
    assert (calib["a"].gram_train is calib["b"].gram_train) == (not split)
    assert torch.equal(calib["a"].gram_train, calib["b"].gram_train) == (not split)


def _old_moments(model, names, batches, max_rows, val_every=VAL_EVERY):
    """The moments as accumulated before the split-limited rows: every batch's full
    float64 rows cut to what the split still takes, summed into float64 zeros."""
    from lyoncompress.capture import input_rows

    seen = {}
    hooks = [
        dict(model.named_modules())[name].register_forward_pre_hook(
            lambda _, inputs, name=name: seen.__setitem__(name, inputs[0].detach())
        )
        for name in names
    ]
    n = {name: dict(model.named_modules())[name].in_features for name in names}
    grams = {name: [torch.zeros(n[name], n[name], dtype=F64) for _ in range(2)] for name in names}
    rows = {name: [0, 0] for name in names}
    try:
        for index, batch in enumerate(batches):
            split = 1 if held_out(index, val_every) else 0
            with torch.no_grad():
                model(**batch)
            for name in names:
                taken = input_rows(seen[name], batch["attention_mask"])[: max_rows - rows[name][split]]
                grams[name][split] += taken.T @ taken
                rows[name][split] += len(taken)
            if all(min(r) >= max_rows for r in rows.values()):
                break
    finally:
        for hook in hooks:
            hook.remove()
    return grams, rows


@pytest.mark.parametrize("max_rows", [1, 7, 12, 10_000])
def test_moments_from_the_rows_a_split_takes_equal_the_old_accumulation_bit_for_bit(max_rows):
    torch.manual_seed(0)
    model = _Tokens()
    batches = _text_batches(9)
    for batch in batches:  # a dead input feature beside an always-negative one: (0 * -x) sums to -0.0
        batch["input_ids"][..., 0] = 0.0
        batch["input_ids"][..., 1] = -batch["input_ids"][..., 1].abs() - 0.5
    calib = capture_inputs(model, ["up", "down"], batches, max_samples=max_rows)
    grams, rows = _old_moments(model, ["up", "down"], batches, max_rows)
    for name in ("up", "down"):
        for mine, old in ((calib[name].gram_train, grams[name][0]), (calib[name].gram_val, grams[name][1])):
            assert torch.equal(mine, old)
            assert torch.equal(torch.signbit(mine), torch.signbit(old))  # +0.0 where zeros gave +0.0
        assert (calib[name].rows_train, calib[name].rows_val) == tuple(rows[name])


def test_input_rows_with_a_limit_are_the_first_rows_of_the_whole_batch():
    from lyoncompress.capture import input_rows

    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))  # float32 (batch, seq, n)
    mask = (torch.arange(6) < torch.tensor([[2], [6], [0], [3]])).long()
    for given in (mask, None):
        whole = input_rows(x, given)
        assert whole.dtype == F64
        for limit in (0, 1, 2, 5, len(whole), len(whole) + 3):
            assert torch.equal(input_rows(x, given, limit), whole[:limit])
