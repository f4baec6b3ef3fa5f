"""A whole mesh on one machine: etcd servers and agent processes on 127.0.0.1 for
``meshctl up``, the tests' fixtures and ``meshctl demo``. May import anything below
``cli``."""
