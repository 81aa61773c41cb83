"""`make bench`: spin-fast's throughput and memory against its peers. Results land in bench/results/."""
