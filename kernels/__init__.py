"""Triton kernels and their launchers (installed as ``pykd.kernels``). No autograd here."""
