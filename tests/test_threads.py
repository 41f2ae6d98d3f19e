"""CPU thread choice (vpdsr/threads.py): as many as other work leaves free, the user's choice kept."""

import os

import torch

from vpdsr import threads


def test_threads_follow_the_free_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for others, expected in [(0, 2), (1, 1), (5, 1)]:
        monkeypatch.setattr(threads, "_other_runnable", lambda n=others: n)
        assert threads.auto_threads() == expected
    monkeypatch.setattr(threads, "_other_runnable", lambda: None)  # no /proc/loadavg: every usable core
    assert threads.auto_threads() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # busy cores elsewhere on a large machine do not count
    monkeypatch.setattr(threads, "_other_runnable", lambda: 30)
    assert threads.auto_threads() == 2


def test_cpu_threads_restores_the_count_and_keeps_the_users(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "auto_threads", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with threads.cpu_threads(None):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user chose: auto is not asked
    monkeypatch.setattr(threads, "auto_threads", lambda: 1 / 0)
    with threads.cpu_threads(None):
        assert torch.get_num_threads() == before
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)
