"""Per-image outcome vectors: packing, the JSON encoding and ``evaluate(..., outcomes=True)``."""
import numpy as np
import pytest
import torch
from conftest import tiny_net

from sparta import outcomes
from sparta.data.base import ImageSet
from sparta.distributed import SINGLE
from sparta.evaluate import evaluate, gather_outcomes
from sparta.outcomes import Outcomes


@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 1000])
def test_pack_encode_decode_round_trip(n):
    bits = (np.random.default_rng(n).random(n) < 0.5) if n else np.zeros(0, dtype=bool)
    value = outcomes.pack(bits.tolist())
    assert outcomes.pack(bits) == value  # an array (as evaluate packs) and a list give the same vector
    assert all(bool(value >> i & 1) == bits[i] for i in range(n))
    text = outcomes.encode(value, n)
    assert outcomes.decode(text) == value and len(text) == 4 * -(-((n + 7) // 8) // 3)  # base64 of ceil(n / 8) bytes
    o = Outcomes(n, value, value & (value >> 1))
    assert Outcomes.from_json(o.to_json()) == o
    with pytest.raises(ValueError, match=f"over {n} images"):
        outcomes.encode(value | 1 << n, n)  # one bit past the last image
    with pytest.raises(ValueError):
        outcomes.encode(-1, n)


def test_find_takes_the_last_record_of_a_key():
    old, new = Outcomes(3, 0b001, 0b000), Outcomes(3, 0b111, 0b101)
    records = [outcomes.record(old, stage="train", epoch=2, split="test"),
               outcomes.record(Outcomes(3, 0, 0), stage="train", epoch=2, split="gap"),
               outcomes.record(new, stage="train", epoch=2, split="test")]  # a resumed run evaluated epoch 2 again
    assert outcomes.find(records, split="test", epoch=2) == new
    assert outcomes.find(records, split="test", epoch=2, stage="search") is None


def test_evaluate_outcomes_count_what_the_accuracies_say():
    torch.manual_seed(0)
    model = tiny_net()
    data = ImageSet(torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (37,)))

    def attack(m, x, y):
        return (x + 0.3 * torch.sign(torch.randn_like(x))).clamp(0, 1)

    r = evaluate(model, data, attack, batch_size=8, device=torch.device("cpu"), outcomes=True)  # 8 x 4 + 5
    o = r["outcomes"]
    assert o.n == r["n"] == 37 and 0 < o.robust.bit_count() < o.n  # both outcomes occur
    assert o.clean.bit_count() == round(r["clean_acc"] * 37 / 100) and o.accuracy("clean") == r["clean_acc"]
    assert o.robust.bit_count() == round(r["robust_acc"] * 37 / 100) and o.accuracy("robust") == r["robust_acc"]
    model.eval()
    with torch.no_grad():  # image by image, in order: the clean predictions need no attack
        clean = model(data.images.float() / 255).argmax(1) == data.labels
    assert o.clean == outcomes.pack(clean.tolist())
    assert "outcomes" not in evaluate(model, data, attack, batch_size=8, device=torch.device("cpu"))


def test_gathered_outcomes_put_each_rank_slice_in_rank_order():
    bits = torch.rand(2, 13, generator=torch.Generator().manual_seed(1)) < 0.5  # (clean, robust) x 13 images
    ranks = [gather_outcomes([part[:, :3], part[:, 3:]], SINGLE) for part in (bits[:, :7], bits[:, 7:])]

    class TwoRanks:
        def all_gather(self, obj):
            return [(o.n, o.clean, o.robust) for o in ranks]

    whole = gather_outcomes([bits[:, :7]], TwoRanks())
    assert whole == Outcomes(13, outcomes.pack(bits[0].tolist()), outcomes.pack(bits[1].tolist()))
