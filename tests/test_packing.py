"""spin_fast.packing: layout invariants on fresh random groups, the kernel's sequence-id contract, errors."""

from __future__ import annotations

import pytest
import torch

import spin_kernels
from spin_fast.packing import MicroBatch, Sequence, check_fits, group_tokens, pack_groups, packing_efficiency

VOCAB = 50


def _ids(low: int, high: int) -> tuple[int, ...]:
    """Random token ids, length drawn in [low, high]."""
    length = int(torch.randint(low, high + 1, ()))
    return tuple(torch.randint(0, VOCAB, (length,)).tolist())


def random_groups(n_groups: int, group_size: int, max_prompt: int = 9, max_response: int = 9,
                  own_prompts: float = 0.0) -> list[list[Sequence]]:
    """Groups sharing a prompt within each group, as SPIN pairs do; a share own_prompts of the groups give each
    sequence a prompt of its own."""
    groups = []
    for _ in range(n_groups):
        prompt = _ids(1, max_prompt)
        own = bool(torch.rand(()) < own_prompts)
        groups.append([Sequence(_ids(1, max_prompt) if own else prompt, _ids(1, max_response))
                       for _ in range(group_size)])
    return groups


def group_length(group: list[Sequence]) -> int:
    return sum(sequence.length for sequence in group)


def check_invariants(groups: list[list[Sequence]], batches: list[MicroBatch], budget: int,
                     share_prompts: bool = False) -> None:
    """Every property packing promises, checked against the groups themselves."""
    k = len(groups[0])
    seen = []
    for mb in batches:
        G = mb.group_indices.numel()
        seen += mb.group_indices.tolist()
        assert mb.group_size == k
        for name in ("input_ids", "position_ids", "hidden_index", "targets", "sequence_ids", "group_indices"):
            assert getattr(mb, name).dtype == torch.int64, name
        assert mb.cu_seqlens.dtype == torch.int32
        assert mb.input_ids.shape == mb.position_ids.shape
        assert mb.hidden_index.shape == mb.targets.shape == mb.sequence_ids.shape
        assert 0 < mb.n_tokens <= budget, "budget respected"
        members = [groups[g] for g in mb.group_indices.tolist()]
        # No padding: the row holds the tokens of its groups' sequences, a shared prompt once.
        shared = [share_prompts and len(set(s.prompt_ids for s in group)) == 1 and k > 1 for group in members]
        row_tokens = sum(group_length(group) - (k - 1) * len(group[0].prompt_ids) * is_shared
                         for group, is_shared in zip(members, shared))
        assert mb.n_tokens == row_tokens
        assert mb.n_sequence_tokens == sum(group_length(group) for group in members)
        assert (mb.expand_index is None) == (not any(shared))
        expand = torch.arange(mb.n_tokens) if mb.expand_index is None else mb.expand_index
        collapse = torch.arange(mb.n_tokens) if mb.collapse_index is None else mb.collapse_index
        assert expand.numel() == mb.n_sequence_tokens and collapse.numel() == mb.n_tokens
        # Each row token keeps an attention output computed for itself, and every row token is used.
        assert torch.equal(expand[collapse], torch.arange(mb.n_tokens))
        assert mb.cu_seqlens.numel() == k * G + 1
        assert mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == mb.n_sequence_tokens
        assert mb.max_seqlen == max(s.length for group in members for s in group)
        assert mb.targets.numel() == sum(len(s.response_ids) for group in members for s in group)
        # Groups one after the other; sequence j of the g-th group here has id j * G + g.
        for g, group in enumerate(members):
            for j, sequence in enumerate(group):
                sid = j * G + g
                start, end = int(mb.cu_seqlens[g * k + j]), int(mb.cu_seqlens[g * k + j + 1])
                assert end - start == sequence.length
                rows = expand[start:end]  # the whole sequence, gathered from the row
                tokens = list(sequence.prompt_ids + sequence.response_ids)
                assert mb.input_ids[rows].tolist() == tokens
                assert mb.position_ids[rows].tolist() == list(range(sequence.length))
                # Its loss tokens: the response, each predicted by the row of the token before it.
                mine = mb.sequence_ids == sid
                n_prompt = len(sequence.prompt_ids)
                assert mb.targets[mine].tolist() == list(sequence.response_ids)
                assert mb.hidden_index[mine].tolist() == rows[n_prompt - 1 : -1].tolist()
    # Every group exactly once (so its k sequences all sit in one micro-batch).
    assert sorted(seen) == list(range(len(groups)))


@pytest.mark.parametrize("share_prompts", [False, True], ids=["whole", "shared-prompts"])
@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_random_groups_invariants(group_size, share_prompts):
    for _ in range(5):
        groups = random_groups(int(torch.randint(1, 40, ())), group_size, own_prompts=0.3)
        longest = max(group_length(group) for group in groups)
        budget = longest + int(torch.randint(0, 3 * longest, ()))
        batches = pack_groups(groups, budget, share_prompts=share_prompts)
        check_invariants(groups, batches, budget, share_prompts)
        # Greedy: a micro-batch was closed only because the next group did not fit.
        for mb, nxt in zip(batches, batches[1:]):
            assert mb.n_tokens + group_tokens(groups[int(nxt.group_indices[0])], share_prompts) > budget


def test_positions_restart_at_each_boundary():
    groups = random_groups(12, 2)
    for mb in pack_groups(groups, 4 * max(group_length(g) for g in groups)):
        starts = mb.cu_seqlens[:-1].long()
        assert (mb.position_ids[starts] == 0).all()
        # Everywhere else the position is the previous one plus 1.
        inside = torch.ones(mb.n_tokens, dtype=torch.bool)
        inside[starts] = False
        assert (mb.position_ids[1:][inside[1:]] == mb.position_ids[:-1][inside[1:]] + 1).all()


@pytest.mark.parametrize("share_prompts", [False, True], ids=["whole", "shared-prompts"])
def test_pair_sequence_ids_match_fused_spin_loss(share_prompts):
    """policy_logps[g] / [G + g] = log p(real / generated response of group g), computed by hand."""
    hidden_size = 8
    groups = random_groups(3, 2)
    (mb,) = pack_groups(groups, 10_000, share_prompts=share_prompts)
    G = 3
    hidden = torch.randn(mb.n_tokens, hidden_size, dtype=torch.float64)
    weight = torch.randn(VOCAB, hidden_size, dtype=torch.float64)
    opponent_logps = -torch.rand(2 * G, dtype=torch.float64) * 10
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, mb.targets, mb.sequence_ids, opponent_logps,
                                              hidden_index=mb.hidden_index)
    logps = torch.log_softmax(hidden @ weight.T, dim=-1)
    offset = 0
    expected = {}
    # Walk the row in the documented layout without using hidden_index, targets or sequence_ids: group after
    # group, each sequence whole, or a shared prompt once and then each response.
    for g in range(G):
        for j in range(2):
            sequence = groups[g][j]
            n_prompt = len(sequence.prompt_ids)
            if j == 0 or not share_prompts:
                last_prompt_row = offset + n_prompt - 1
                offset += n_prompt
            predictors = [last_prompt_row] + list(range(offset, offset + len(sequence.response_ids) - 1))
            expected[j * G + g] = sum(logps[row, token] for row, token in zip(predictors, sequence.response_ids))
            offset += len(sequence.response_ids)
    assert offset == mb.n_tokens
    for g in range(G):
        torch.testing.assert_close(out.policy_logps[g], expected[g], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.policy_logps[G + g], expected[G + g], rtol=1e-10, atol=1e-10)


def test_shared_prompt_layout_by_hand():
    """Pair 0 (prompt 1 2 3; responses 4 5 and 6 7 8) holds its prompt once; pair 1 too; 11 row tokens, not 15."""
    groups = [[Sequence((1, 2, 3), (4, 5)), Sequence((1, 2, 3), (6, 7, 8))],
              [Sequence((9,), (10,)), Sequence((9,), (11,))]]
    with pytest.raises(ValueError, match="group 0 has 11 tokens"):  # whole, pair 0 alone is over 10 tokens
        pack_groups(groups, 10)
    (mb,) = pack_groups(groups, 11, share_prompts=True)
    assert mb.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1]
    # The prompt's last token (row 2) predicts 4 and 6; the generated response 6 7 8 continues from it.
    assert mb.hidden_index.tolist() == [2, 3, 2, 5, 6, 8, 8]
    assert mb.targets.tolist() == [4, 5, 6, 7, 8, 10, 11]
    assert mb.sequence_ids.tolist() == [0, 0, 2, 2, 2, 1, 3]
    assert mb.expand_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 8, 10]
    assert mb.collapse_index.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 14]
    assert mb.cu_seqlens.tolist() == [0, 5, 11, 13, 15] and mb.max_seqlen == 6
    assert mb.n_tokens == 11 and mb.n_sequence_tokens == 15


def test_sft_groups_of_one():
    groups = random_groups(20, 1)
    budget = 2 * max(group_length(g) for g in groups)
    batches = pack_groups(groups, budget)
    check_invariants(groups, batches, budget)
    for mb in batches:
        assert mb.sequence_ids.unique().tolist() == list(range(mb.group_indices.numel()))
    assert pack_groups(groups, budget, share_prompts=True)[0].expand_index is None, "a group of one shares nothing"


def test_empty_input():
    assert pack_groups([], 16) == []
    assert packing_efficiency([], 16) == 0.0


def test_group_too_long():
    groups = [[Sequence((1, 2), (3,))], [Sequence((1, 2, 3), (4, 5, 6))]]
    with pytest.raises(ValueError, match=r"group 1 has 6 tokens.*token_budget=5"):
        pack_groups(groups, 5)


def test_mixed_group_sizes():
    pair = [Sequence((1,), (2,)), Sequence((1,), (3,))]
    with pytest.raises(ValueError, match="group 2 has 1 sequences, expected 2"):
        pack_groups([pair, pair, pair[:1]], 100)
    with pytest.raises(ValueError, match="group 1 is empty"):
        pack_groups([pair, []], 100)


@pytest.mark.parametrize("budget", [0, -3])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        pack_groups([[Sequence((1,), (2,))]], budget)


def test_bad_order_and_sequences():
    groups = [[Sequence((1,), (2,))]] * 3
    for order in ([0, 1], [0, 1, 1], [0, 1, 3]):
        with pytest.raises(ValueError, match="permutation"):
            pack_groups(groups, 10, order=order)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Sequence((), (1,))
    with pytest.raises(ValueError, match="response_ids is empty"):
        Sequence((1,), ())
    with pytest.raises(ValueError, match="negative"):
        Sequence((1,), (2, -1))


def test_sequence_normalises_to_tuples():
    sequence = Sequence([1, 2], [3])
    assert sequence.prompt_ids == (1, 2) and sequence.response_ids == (3,) and sequence.length == 3
    hash(sequence)


def test_packing_efficiency_hand_made():
    # Budget 10; group lengths 6, 6, 4 -> [6], [6, 4]: 16 tokens in 2 rows of 10.
    groups = [[Sequence((1,) * 3, (2,) * 3)], [Sequence((1,) * 2, (2,) * 4)], [Sequence((1,), (2,) * 3)]]
    batches = pack_groups(groups, 10)
    assert [mb.group_indices.tolist() for mb in batches] == [[0], [1, 2]]
    assert packing_efficiency(batches, 10) == pytest.approx(0.8)


def test_packing_efficiency_counts_a_shared_prompt_once():
    """The row's tokens, not the whole sequences': a pair holding its prompt (3 tokens) once takes 8 of 10."""
    groups = [[Sequence((1, 2, 3), (4, 5)), Sequence((1, 2, 3), (6, 7, 8))]]
    batches = pack_groups(groups, 10, share_prompts=True)
    assert packing_efficiency(batches, 10) == pytest.approx(0.8)  # 11 whole-sequence tokens would give 1.1


def test_check_fits_takes_an_exact_fit_and_names_the_longest_group():
    groups = [[Sequence((1, 2), (3,))], [Sequence((1, 2, 3), (4, 5, 6))], [Sequence((1,), (2, 3))]]  # 3, 6, 3 tokens
    check_fits(groups, False, 6, "train.micro_batch_tokens", "item")  # 6 tokens fit a budget of 6
    with pytest.raises(ValueError, match=r"^train.micro_batch_tokens=5: item 1 \(counted from 0\) takes 6 tokens: "
                                         r"raise train.micro_batch_tokens or cut$"):
        check_fits(groups, False, 5, "train.micro_batch_tokens", "item", " or cut")
    with pytest.raises(ValueError, match=r"^s=5: a.jsonl line 2 takes 6 tokens"):  # by its row, not row 0
        check_fits(groups, False, 5, "s", "item", names=["a.jsonl line 1", "a.jsonl line 2", "a.jsonl line 3"])
    # A pair holding its 3-token prompt once takes 4 + 5 - 3 = 6 tokens, whole 9.
    pair = [[Sequence((1, 2, 3), (4,)), Sequence((1, 2, 3), (5, 6))]]
    check_fits(pair, True, 6, "s", "pair")
    with pytest.raises(ValueError, match=r"^s=6: pair 0 \(counted from 0\) takes 9 tokens"):
        check_fits(pair, False, 6, "s", "pair")


def test_order_changes_packing_deterministically():
    # Lengths 6, 6, 4, 4 with budget 10: in order -> [6], [6, 4], [4]; interleaved -> [6, 4], [6, 4].
    groups = [[Sequence((1,) * 2, (2,) * (n - 2))] for n in (6, 6, 4, 4)]
    assert [mb.group_indices.tolist() for mb in pack_groups(groups, 10)] == [[0], [1, 2], [3]]
    interleaved = pack_groups(groups, 10, order=[0, 2, 1, 3])
    assert [mb.group_indices.tolist() for mb in interleaved] == [[0, 2], [1, 3]]
    # Random groups, shuffled order: same order -> identical batches, and the walk follows the order.
    groups = random_groups(30, 2)
    budget = 3 * max(group_length(g) for g in groups)
    order = torch.randperm(len(groups)).tolist()  # the trainer's epoch_order is such a permutation
    first, second = pack_groups(groups, budget, order=order), pack_groups(groups, budget, order=order)
    check_invariants(groups, first, budget)
    assert torch.cat([mb.group_indices for mb in first]).tolist() == order
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for name in ("input_ids", "position_ids", "hidden_index", "targets", "sequence_ids", "cu_seqlens",
                     "group_indices"):
            assert torch.equal(getattr(a, name), getattr(b, name))


def test_first_fit_decreasing_hand_made_and_random():
    # Lengths 5, 6, 4, 3, 2 with budget 10: in order -> [5], [6, 4], [3, 2]; first fit decreasing, longest first
    # and each into the first row it fits -> [6, 4], [5, 3, 2].
    groups = [[Sequence((1,), (2,) * (n - 1))] for n in (5, 6, 4, 3, 2)]
    assert [mb.group_indices.tolist() for mb in pack_groups(groups, 10)] == [[0], [1, 2], [3, 4]]
    ffd = pack_groups(groups, 10, first_fit_decreasing=True)
    assert [mb.group_indices.tolist() for mb in ffd] == [[1, 2], [0, 3, 4]]
    check_invariants(groups, ffd, 10)
    with pytest.raises(ValueError, match="give no order"):
        pack_groups(groups, 10, order=[0, 1, 2, 3, 4], first_fit_decreasing=True)
    for share_prompts in (False, True):
        groups = random_groups(40, 2, own_prompts=0.3)
        budget = max(group_length(g) for g in groups) + int(torch.randint(0, 40, ()))
        ffd = pack_groups(groups, budget, share_prompts=share_prompts, first_fit_decreasing=True)
        check_invariants(groups, ffd, budget, share_prompts)
        assert len(ffd) <= len(pack_groups(groups, budget, share_prompts=share_prompts))


def test_a_first_fit_decreasing_row_packed_again_is_the_same_row():
    """evaluation.shared_logprobs deals out one process's micro-batches and each rank scores a batch's groups with
    model_logprobs, which packs them again first-fit decreasing: the row must be the very same one (equal lengths
    included, in index order), so that the sums are one process's bit for bit."""
    for share_prompts in (False, True):
        groups = random_groups(40, 2, own_prompts=0.3) + [[Sequence((1, 2), (3,)), Sequence((1, 2), (4,))]] * 5
        budget = max(group_length(g) for g in groups) + int(torch.randint(0, 40, ()))
        for batch in pack_groups(groups, budget, share_prompts=share_prompts, first_fit_decreasing=True):
            chunk = [groups[i] for i in batch.group_indices.tolist()]
            (again,) = pack_groups(chunk, budget, share_prompts=share_prompts, first_fit_decreasing=True)
            assert again.group_indices.tolist() == list(range(len(chunk)))
            for name in ("input_ids", "position_ids", "hidden_index", "targets", "sequence_ids", "cu_seqlens"):
                assert torch.equal(getattr(again, name), getattr(batch, name)), name


def test_microbatch_to():
    (mb,) = pack_groups(random_groups(3, 2), 10_000, share_prompts=True)
    moved = mb.to("meta")
    assert moved is not mb
    for name in ("input_ids", "position_ids", "hidden_index", "targets", "sequence_ids", "cu_seqlens",
                 "group_indices", "expand_index", "collapse_index"):
        tensor = getattr(moved, name)
        assert tensor.device.type == "meta" and tensor.dtype == getattr(mb, name).dtype
        assert getattr(mb, name).device.type == "cpu", "the original stays where it was"
    assert moved.max_seqlen == mb.max_seqlen and moved.group_size == mb.group_size
    back = mb.to(torch.device("cpu"))
    assert torch.equal(back.input_ids, mb.input_ids) and back.n_tokens == mb.n_tokens


def _scan_first_fit(lengths: list[int], budget: int, first_fit: bool) -> list[list[int]]:
    """The packing's chunks as pack_groups made them before its tree: first fit scans every row for each group
    (longest first), next fit looks at the last row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if first_fit else range(len(lengths))
    chunks, used = [], []
    for index in order:
        candidates = range(0 if first_fit else max(len(chunks) - 1, 0), len(chunks))
        target = next((c for c in candidates if used[c] + lengths[index] <= budget), None)
        if target is None:
            chunks.append([])
            used.append(0)
            target = len(chunks) - 1
        chunks[target].append(index)
        used[target] += lengths[index]
    return chunks


@pytest.mark.parametrize("share_prompts", [False, True])
def test_packing_makes_the_rows_a_scan_of_every_row_makes(share_prompts):
    """The tree that finds a group's first row with room gives the very rows the scan of every row gave (ties,
    exact fits and many short groups included)."""
    for _ in range(8):
        groups = random_groups(int(torch.randint(1, 150, ())), 2, own_prompts=0.3)
        lengths = [group_tokens(g, share_prompts) for g in groups]
        budget = max(lengths) + int(torch.randint(0, 30, ()))
        for first_fit in (True, False):
            batches = pack_groups(groups, budget, share_prompts=share_prompts, first_fit_decreasing=first_fit)
            assert [b.group_indices.tolist() for b in batches] == _scan_first_fit(lengths, budget, first_fit)
    # Drawn rarely above: one group, every group exactly the budget, ties that fill rows exactly.
    for lengths, budget in [([5], 5), ([5], 9), ([6] * 7, 6), ([3, 3, 2, 4, 3, 3, 2, 4], 6), ([2] * 9 + [7], 8)]:
        groups = [[Sequence((1,), (2,) * (length - 1))] for length in lengths]
        for first_fit in (True, False):
            batches = pack_groups(groups, budget, share_prompts=share_prompts, first_fit_decreasing=first_fit)
            assert [b.group_indices.tolist() for b in batches] == _scan_first_fit(lengths, budget, first_fit)


def test_first_fit_decreasing_work_grows_as_n_log_n():
    """Choosing the rows takes about log(n) steps a group, not one per row made so far: a scan of every row for each
    group took minutes for a 200k-pair stage scored at once (save_every_prompts 0). Counted in Python lines run in
    packing.py while choosing (the rows' tensors, made after, are not counted), not timed."""
    import math
    import sys

    n, budget = 1000, 64
    groups = [[Sequence((1,), (2,) * int(torch.randint(1, budget, ())))] for _ in range(n)]
    lines = 0

    def count(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return count

    def trace(frame, event, arg):
        code = frame.f_code
        return count if code.co_filename.endswith("packing.py") and code.co_name not in ("_build", "_ranges") else None

    previous = sys.gettrace()  # coverage's or a debugger's, given back after
    sys.settrace(trace)
    try:
        batches = pack_groups(groups, budget, first_fit_decreasing=True)
    finally:
        sys.settrace(previous)
    assert len(batches) > n // 4  # many rows: a scan of all of them for each group is what is ruled out
    assert lines < 20 * n * math.log2(n), lines
