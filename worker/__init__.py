"""tasksync: keeps Huawei Cloud tasks (AICC, SecMaster, KooDrive) in a database and acts on them."""

__version__ = "0.1.0"
