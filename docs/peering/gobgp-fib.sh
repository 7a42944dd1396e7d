#!/bin/sh
# GoBGP keeps its routes in its own RIB; this loop copies its best IPv4 and IPv6 paths into the
# kernel (protocol "bgp") and removes the ones it no longer has. Run it next to gobgpd, in the
# same network namespace. (GoBGP's zebra client can do the same through FRR's zebra, but not with
# every FRR release: check yours before relying on it.)
while :; do
  for family in 4 6; do
    want=$(gobgp global rib -a ipv$family | awk '$1 == "*>" && $2 ~ /\// && $3 != "0.0.0.0" && $3 != "::" { print $2, $3 }')
    echo "$want" | while read -r prefix nexthop; do
      [ -n "$prefix" ] && ip -$family route replace "$prefix" via "$nexthop" proto bgp
    done
    ip -$family route show proto bgp | awk -v f=$family '{ print ($1 != "default" ? $1 : f == 4 ? "0.0.0.0/0" : "::/0") }' | while read -r prefix; do
      echo "$want" | grep -q "^$prefix " || ip -$family route del "$prefix" proto bgp
    done
  done
  sleep 0.2
done
