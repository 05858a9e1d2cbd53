"""Clusters: Ray autoscaler cluster configs on Azure (and fake_multinode on one machine),
their life cycle (``raybatch cluster``), pre-flight checks, node set-up and spot evictions."""
