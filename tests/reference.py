"""An independent NumPy reference for J and grad J of a tabular softmax policy.

It reads gymnasium's transition tables itself and uses dense matrices and the closed-form softmax
gradient grad_theta[s, a] = sum_t gamma^t d_t(s) pi(a|s) A_t(s, a): no code shared with suite/.
"""

from __future__ import annotations

import numpy as np


def gym_tables(env_id: str, **kwargs):
    import gymnasium as gym

    env = gym.make(env_id, **kwargs).unwrapped
    S, A = env.observation_space.n, env.action_space.n
    P = np.zeros((S, A, S))
    r = np.zeros((S, A))  # expected reward
    P_cont = np.zeros((S, A, S))  # probability of s' without termination
    for s in range(S):
        for a in range(A):
            for prob, nxt, reward, done in env.P[s][a]:
                P[s, a, nxt] += prob
                r[s, a] += prob * reward
                if not done:
                    P_cont[s, a, nxt] += prob
    return P, r, P_cont, np.asarray(env.initial_state_distrib, dtype=float)


def reference_gradient(r, P_cont, rho0, logits, gamma, H):
    """(J, grad [S, A]) for the tabular softmax policy with these logits."""
    z = np.exp(logits - logits.max(1, keepdims=True))
    pi = z / z.sum(1, keepdims=True)
    S = r.shape[0]
    Q = np.zeros((H, *r.shape))
    V = np.zeros((H + 1, S))
    for t in range(H - 1, -1, -1):
        Q[t] = r + gamma * P_cont @ V[t + 1]
        V[t] = (pi * Q[t]).sum(1)
    d = np.zeros((H, S))
    d[0] = rho0
    for t in range(H - 1):
        d[t + 1] = np.einsum("s,sa,sap->p", d[t], pi, P_cont)
    disc = gamma ** np.arange(H)
    grad = np.einsum("t,ts,sa,tsa->sa", disc, d, pi, Q - V[:H, :, None])
    return float(rho0 @ V[0]), grad
