"""The KV cache's bookkeeping (src/kv_cache.cpp): its per-sequence index (kv_seq_cells), the
epochs a GPU mirror of that index relies on, the free-cell choice and the used-cell count, against
a brute-force model of the cell table over thousands of random operations; and a printed (not
asserted) measurement of the host cost of one decode step's bookkeeping at n_ctx 131072."""
from __future__ import annotations

import time

import numpy as np
import pytest

from glmoe import _core
from glmoe.tools.make_model import ModelSpec, write_model

MAX_SEQ = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # One thin layer: the cache's K/V arrays stay small even at n_ctx 131072.
    path = tmp_path_factory.mktemp("kvidx") / "tiny.gguf"
    write_model(str(path), ModelSpec(vocab=64, hidden=32, n_layers=1, n_dense_leading=1, n_head=2,
                                     n_head_kv=1, head_dim=16, n_rot=8, ffn=32), seed=3)
    return _core.Model(str(path))


class CellTable:
    """The cache as the unindexed implementation defined it: per cell a position and a set of
    sequences; a cell is free when its set is empty; new tokens take the lowest free cells."""

    def __init__(self, n_ctx):
        self.pos = [-1] * n_ctx
        self.seqs = [set() for _ in range(n_ctx)]

    def used(self):
        return sum(1 for s in self.seqs if s)

    def cells(self, seq):
        return [c for _, c in sorted((self.pos[c], c) for c in range(len(self.pos)) if seq in self.seqs[c])]

    def pos_max(self, seq):
        return max((self.pos[c] for c in range(len(self.pos)) if seq in self.seqs[c]), default=-1)

    def allocate(self, seq, pos):
        """The cells taken, or the exception type expected (and then nothing changes)."""
        batch = list(zip(seq, pos))
        if len(set(batch)) != len(batch):
            return ValueError
        for s, p in batch:
            if any(s in self.seqs[c] and self.pos[c] == p for c in range(len(self.pos))):
                return ValueError
        free = [c for c in range(len(self.pos)) if not self.seqs[c]]
        if len(free) < len(batch):
            return _core.KVCacheFullError
        for c, (s, p) in zip(free, batch):
            self.pos[c], self.seqs[c] = p, {s}
        return free[:len(batch)]

    def _drop(self, c, seqs):
        self.seqs[c] -= seqs
        if not self.seqs[c]:
            self.pos[c] = -1

    def seq_rm(self, seq, p0, p1):
        p1 = 2**31 - 1 if p1 < 0 else p1
        seqs = set(range(MAX_SEQ)) if seq < 0 else {seq}
        for c in range(len(self.pos)):
            if self.seqs[c] & seqs and p0 <= self.pos[c] < p1:
                self._drop(c, seqs)

    def seq_cp(self, src, dst, p0, p1):
        p1 = 2**31 - 1 if p1 < 0 else p1
        for c in range(len(self.pos)):
            if src in self.seqs[c] and p0 <= self.pos[c] < p1:
                self.seqs[c].add(dst)

    def seq_keep(self, seq):
        for c in range(len(self.pos)):
            self._drop(c, self.seqs[c] - {seq})

    def clear(self):
        self.__init__(len(self.pos))


def check(ctx, table, mirrors, seqs):
    assert ctx.kv_used == table.used()
    for s in seqs:
        cells = ctx.kv_seq_cells(s)
        assert cells == table.cells(s), f"sequence {s}"
        assert ctx.kv_seq_pos_max(s) == table.pos_max(s)
        # A mirror of the list taken at the same epoch must still be a prefix of it: that is all a
        # GPU copy of the list checks before uploading only the new tail.
        epoch = ctx.kv_seq_epoch(s)
        old_epoch, old_cells = mirrors.get(s, (None, None))
        if epoch == old_epoch:
            assert cells[:len(old_cells)] == old_cells, f"sequence {s} changed without a new epoch"
        mirrors[s] = (epoch, cells)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_matches_cell_table(model, seed):
    rng = np.random.default_rng(seed)
    n_ctx = 48  # small, so the cache fills, cells are reused and positions collide
    ctx = _core.Context(model, n_ctx, 1)
    table = CellTable(n_ctx)
    mirrors = {}
    pool = [0, 1, 2, 3, 63]  # 63: the mask's top bit

    def rand_seq():
        return int(rng.choice(pool))

    def rand_range():
        p0 = int(rng.integers(-2, 40))
        return p0, -1 if rng.random() < 0.3 else int(rng.integers(p0 - 2, 45))

    for step in range(3000):
        op = rng.random()
        if op < 0.45:  # allocate: mostly each sequence's next positions, sometimes anywhere
            n = int(rng.integers(1, 7))
            seq, pos = [], []
            for _ in range(n):
                s = rand_seq()
                nxt = max(table.pos_max(s), max((p for q, p in zip(seq, pos) if q == s), default=-1)) + 1
                seq.append(s)
                pos.append(nxt if rng.random() < 0.7 else int(rng.integers(0, 40)))
            expect = table.allocate(seq, pos)
            via_decode = rng.random() < 0.1
            try:
                if via_decode:
                    ctx.decode(rng.integers(0, model.n_vocab, n).astype(np.int32), np.array(pos, np.int32),
                               np.array(seq, np.int32), np.zeros(n, np.uint8))
                    got = None
                else:
                    got = ctx.kv_allocate(seq, pos)
            except (ValueError, _core.KVCacheFullError) as e:
                assert isinstance(expect, type) and isinstance(e, expect), (step, seq, pos, expect, e)
            else:
                assert not isinstance(expect, type), (step, seq, pos, expect)
                if got is not None:
                    assert got == expect  # lowest free cells, in batch order
        elif op < 0.65:
            s = -1 if rng.random() < 0.1 else rand_seq()
            p0, p1 = rand_range()
            ctx.kv_seq_rm(s, p0, p1)
            table.seq_rm(s, p0, p1)
        elif op < 0.85:
            src, dst = rand_seq(), rand_seq()
            p0, p1 = rand_range()
            ctx.kv_seq_cp(src, dst, p0, p1)
            table.seq_cp(src, dst, p0, p1)
        elif op < 0.93:
            s = rand_seq()
            ctx.kv_seq_keep(s)
            table.seq_keep(s)
        elif op < 0.96:
            # Save and load: the index is rebuilt from the loaded cells.
            state = ctx.kv_state()
            other = _core.Context(model, n_ctx, 1)
            other.kv_load_state(state)
            check(other, table, {}, pool)
            ctx.kv_load_state(state)
        elif op < 0.97:
            ctx.kv_clear()
            table.clear()
        check(ctx, table, mirrors, pool + [int(rng.integers(0, MAX_SEQ))])
    check(ctx, table, mirrors, range(MAX_SEQ))


def test_epoch_stays_on_append_and_changes_otherwise(model):
    ctx = _core.Context(model, 64, 1)

    def epoch_changed(f):
        e = ctx.kv_seq_epoch(0)
        f()
        return ctx.kv_seq_epoch(0) != e

    # Appends at the end, as decode and prefill do, and as seq_cp of a longer prefix does.
    assert not epoch_changed(lambda: ctx.kv_allocate([0] * 4, [0, 1, 2, 3]))
    assert not epoch_changed(lambda: ctx.kv_allocate([0, 0], [5, 4]))
    ctx.kv_allocate([1] * 8, list(range(8)))
    assert not epoch_changed(lambda: ctx.kv_seq_cp(1, 0, 6, -1))
    assert ctx.kv_seq_cells(0) == [0, 1, 2, 3, 5, 4, 12, 13]
    # Anything else.
    assert epoch_changed(lambda: ctx.kv_seq_rm(0, 7, -1))  # the tail
    assert epoch_changed(lambda: ctx.kv_seq_rm(0, 1, 2))  # the middle
    assert epoch_changed(lambda: ctx.kv_allocate([0], [1]))  # into the middle
    assert epoch_changed(lambda: ctx.kv_seq_keep(1))
    assert not epoch_changed(lambda: ctx.kv_seq_rm(0, 100, -1))  # nothing removed
    ctx.kv_allocate([0], [0])
    assert epoch_changed(lambda: ctx.kv_load_state(ctx.kv_state()))
    assert epoch_changed(ctx.kv_clear)


def test_shared_cells_are_freed_by_their_last_sequence(model):
    ctx = _core.Context(model, 8, 1)
    ctx.kv_allocate([0] * 4, [0, 1, 2, 3])
    for dst in (1, 2):
        ctx.kv_seq_cp(0, dst, 0, 2)
    ctx.kv_seq_rm(0, -1, -1)
    assert ctx.kv_used == 2 and ctx.kv_seq_cells(1) == ctx.kv_seq_cells(2) == [0, 1]
    ctx.kv_seq_rm(1, 0, -1)
    assert ctx.kv_used == 2
    assert ctx.kv_allocate([3] * 6, list(range(6))) == [2, 3, 4, 5, 6, 7]
    with pytest.raises(_core.KVCacheFullError):
        ctx.kv_allocate([1], [0])
    ctx.kv_seq_keep(3)
    assert ctx.kv_used == 6 and ctx.kv_allocate([1, 1], [0, 1]) == [0, 1]
    with pytest.raises(ValueError):
        ctx.kv_seq_cells(64)


def test_step_cost_at_131072_cells(model):
    """Prints the host cost of a decode step's cache bookkeeping with the cache nearly full."""
    n_ctx = 131072
    ctx = _core.Context(model, n_ctx, 1)
    n_fill = n_ctx - 8192
    for p0 in range(0, n_fill, 8192):
        n = min(8192, n_fill - p0)
        ctx.kv_allocate([0] * n, list(range(p0, p0 + n)))
    steps = 2000
    t0 = time.perf_counter()
    for p in range(n_fill, n_fill + steps):
        ctx.kv_allocate([0], [p])
        ctx.kv_used
    t_plain = (time.perf_counter() - t0) / steps
    # Speculative steps: 4 drafted tokens, 3 of them rejected.
    t0 = time.perf_counter()
    for p in range(n_fill + steps, n_fill + 2 * steps):
        ctx.kv_allocate([0] * 4, [p, p + 1, p + 2, p + 3])
        ctx.kv_seq_rm(0, p + 1, -1)
        ctx.kv_used
    t_draft = (time.perf_counter() - t0) / steps
    assert ctx.kv_used == n_fill + 2 * steps and ctx.kv_seq_pos_max(0) == n_fill + 2 * steps - 1
    print(f"\nKV bookkeeping per step at n_ctx {n_ctx}, {ctx.kv_used} cells used (incl. Python call overhead): "
          f"decode {t_plain * 1e6:.2f} us, 4-token draft + rollback {t_draft * 1e6:.2f} us")
