"""RLOO's advantage in the signature LLM frameworks use (see docs/your_estimator.md).

    python -m suite measure --env tokens --gamma 1 --horizon 6 --shared-start \
        --trajectories 8000 --batch-size 8 --estimator-file examples/rloo_advantage.py \
        --estimators rloo_advantage:agg=token-sum

Each response's outcome reward minus the mean reward of the *other* responses of its group, at
every token of the response. With the loss summed over tokens (agg=token-sum) this is unbiased,
and the function says so with ``unbiased_with``.
"""

import torch


def rloo_advantage(token_level_rewards, response_mask, group_index):
    """A_i = R_i - mean_{j != i} R_j over the group, at every token of response i."""
    scores = token_level_rewards.sum(-1)  # [bs]
    _, group = torch.unique(torch.as_tensor(group_index), return_inverse=True)
    size = torch.bincount(group).to(scores.dtype)
    total = torch.zeros_like(size).index_add_(0, group, scores)
    others = (total[group] - scores) / (size[group] - 1)
    return (scores - others)[:, None] * response_mask


rloo_advantage.unbiased_with = ("token-sum",)  # the claim the suite tests
