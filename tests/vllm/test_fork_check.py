"""The vLLM token check's fork rule (``fork_at_near_tie``) on hand-made sequences: it needs no vLLM, so
it runs in the main suite."""

from tests.vllm.test_vllm_serving import NEAR_TIE, fork_at_near_tie

TOP = ([5, 6, 7, 8, 9], [-0.5, -0.56, -1.5, -2.0, -3.0])  # the reference's top 5 at every step: 5, then 6 0.06 nats below


def test_equal_tokens_pass():
    assert fork_at_near_tie([[5, 5, 5]], [[TOP] * 3], [[5, 5, 5]]) is None


def test_a_fork_at_a_near_tie_passes_and_later_tokens_are_not_compared():
    assert 0.06 < NEAR_TIE
    assert fork_at_near_tie([[5, 5, 5]], [[TOP] * 3], [[5, 6, 1]]) is None


def test_a_fork_to_a_clearly_worse_token_fails_naming_where():
    msg = fork_at_near_tie([[5, 5, 5]], [[TOP] * 3], [[5, 7, 7]])  # 1.0 nats below
    assert msg is not None and "prompt 0 token 1" in msg and "1.000 nats" in msg


def test_a_fork_outside_the_reference_top_5_fails():
    msg = fork_at_near_tie([[5, 5], [5, 5]], [[TOP] * 2, [TOP] * 2], [[5, 5], [42, 5]])
    assert msg is not None and "prompt 1 token 0" in msg and "top 5" in msg
