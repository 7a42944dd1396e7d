#!/bin/sh
# GoBGP keeps its routes in its own RIB; this loop copies its best IPv4 and IPv6 paths into the
# kernel (protocol "bgp"), stale ones ("S*>", kept while a node restarts gracefully) too, and
# removes the ones it no longer has. Run it next to gobgpd, in the same network namespace.
# (GoBGP's zebra client can do the same through FRR's zebra, but not with every FRR release:
# check yours before relying on it.)
while :; do
  for family in 4 6; do
    # A failed query (gobgpd busy or restarting) leaves the kernel as it is.
    rib=$(gobgp global rib -a ipv$family) || continue
    want=$(echo "$rib" | awk '/^[A-Z]*\*>/ { sub(/^[A-Z]*\*> */, ""); if ($1 ~ /\// && $2 != "0.0.0.0" && $2 != "::") print $1, $2 }')
    echo "$want" | while read -r prefix nexthop; do
      [ -n "$prefix" ] && ip -$family route replace "$prefix" via "$nexthop" proto bgp
    done
    ip -$family route show proto bgp | awk -v f=$family '{ print ($1 != "default" ? $1 : f == 4 ? "0.0.0.0/0" : "::/0") }' | while read -r prefix; do
      echo "$want" | grep -q "^$prefix " || ip -$family route del "$prefix" proto bgp
    done
  done
  sleep 0.2
done
