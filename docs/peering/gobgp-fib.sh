#!/bin/sh
# GoBGP keeps its routes in its own RIB; this loop copies its best IPv4 paths into the kernel
# (protocol "bgp") and removes the ones it no longer has. Run it next to gobgpd, in the same
# network namespace. (GoBGP's zebra client can do the same through FRR's zebra, but not with
# every FRR release: check yours before relying on it.)
while :; do
  want=$(gobgp global rib -a ipv4 | awk '$1 == "*>" && $2 ~ /\// && $3 != "0.0.0.0" { print $2, $3 }')
  echo "$want" | while read -r prefix nexthop; do
    [ -n "$prefix" ] && ip route replace "$prefix" via "$nexthop" proto bgp
  done
  ip -4 route show proto bgp | awk '{ print ($1 == "default" ? "0.0.0.0/0" : $1) }' | while read -r prefix; do
    echo "$want" | grep -q "^$prefix " || ip route del "$prefix" proto bgp
  done
  sleep 0.2
done
