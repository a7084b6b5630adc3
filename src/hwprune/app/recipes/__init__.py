"""Recipes shipped with hwprune: ``hwprune run NAME`` (``hwprune run --list`` shows them).

Each paper's experiment at two scales: ``*-digits`` / ``*-resnet20-cifar10-cpu`` finish in
minutes on a laptop CPU; the others are the paper-sized runs, meant for a GPU.
"""
