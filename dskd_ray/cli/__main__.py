"""`python -m dskd_ray.cli`: the dskd command."""

from dskd_ray.cli.entry import main

main()
