import torch

from qfx.observers import ChannelStatsObserver


def test_channel_stats_are_abs_max_and_abs_mean_over_tokens():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 50, 6, generator=g) for _ in range(3)]
    obs = ChannelStatsObserver(6, rows_per_sequence=10)
    for b in batches:
        assert obs(b) is b
    rows = torch.cat([b.reshape(-1, 6) for b in batches])
    torch.testing.assert_close(obs.abs_max, rows.abs().amax(0))
    torch.testing.assert_close(obs.abs_mean(), rows.abs().mean(0), rtol=1e-5, atol=1e-6)
    sample = obs.sample()
    assert sample.shape == (60, 6)  # 10 rows from each of the 6 sequences
    # every sampled row is a real input row
    assert all((rows == r).all(1).any() for r in sample)


def test_batching_the_sequences_draws_the_same_rows():
    g = torch.Generator().manual_seed(1)
    seqs = torch.randn(8, 100, 5, generator=g)
    one_by_one, batched = ChannelStatsObserver(5, rows_per_sequence=7), ChannelStatsObserver(5, rows_per_sequence=7)
    for s in seqs.split(1):
        one_by_one(s)
    for s in seqs.split(4):
        batched(s)
    torch.testing.assert_close(batched.sample(), one_by_one.sample(), rtol=0, atol=0)
    torch.testing.assert_close(batched.abs_mean(), one_by_one.abs_mean())
