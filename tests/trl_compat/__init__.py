"""TRL-compatibility suite: TRL's own trainer tests run against posttrain (see README.md)."""
