/* Declarations shared by the socket hooks (net_*.c), hidden like everything in layer.h.
 *
 * The files, one concern each:
 *   net_sock.c     socket entries and addresses: text <-> sockaddr, ports, socket(),
 *                  getpeername()/getsockname() showing the target's view
 *   net_connect.c  outgoing: connect() (TCP, UDP, outgoing.unix_streams) through LayerConnect
 *                  and the relay socket spliced in place of the app's
 *   net_udp.c      outgoing UDP without connect(): sendto()/sendmsg() through per-destination
 *                  relays, recvfrom()/recvmsg() translating them back
 *   net_listen.c   incoming: bind(), listen() subscribing (LayerListen), accept() reporting the
 *                  real peer (PeerLookup), listeners kept across exec
 *   net_dns.c      getaddrinfo()/gethostbyname*() through DnsLookup, gethostname()
 */
#ifndef MIRRORD_NET_H
#define MIRRORD_NET_H

#include "layer.h"

#pragma GCC visibility push(hidden)

/* net_sock.c */
int sock_type(int fd);   /* SO_TYPE, or -1 */
int sock_family(int fd); /* the family of its address, or -1 */
/* Copies an address out to the app as the kernel does: truncated to *outlen, which gets the
 * full length. Nothing when out or outlen is NULL. */
void copy_addr_out(const struct sockaddr_storage *ss, socklen_t len, struct sockaddr *out,
                   socklen_t *outlen);
/* The K_SOCK entry of fd, made on first use, with a reference for the caller; NULL when the
 * fd has an entry of another kind or memory ran out. */
struct ent *sock_ent(int fd);
void set_port(struct sockaddr_storage *ss, int port); /* AF_INET or AF_INET6 */
int get_port(const struct sockaddr *sa);
int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b);

/* net_connect.c: LayerConnect. Without `src` (a connect()): *rfd gets the relay socket the
 * daemon passed with the reply, the layer's end of a private loopback pair; with `src` (the
 * app's own UDP socket, bound: sendto()), the daemon answers with an endpoint that takes
 * datagrams from `src` only, and nothing is passed. `relay` is the daemon's end (in the
 * socket's family), `local` the target-side local address. 0, or -1 with errno
 * (ECONNREFUSED when the daemon is unreachable). */
int layer_connect(const char *proto, const struct sockaddr *sa, int family,
                  const struct sockaddr *src, struct sockaddr_storage *relay,
                  socklen_t *relay_len, struct sockaddr_storage *local, socklen_t *local_len,
                  int *rfd);

/* net_udp.c: a UDP socket connected anew (elsewhere, or to a new relay): its old relays end. */
void udp_forget_relays(struct ent *e);

/* net_listen.c: the port really bound by a socket of this process listening on `port` (as the
 * app asked for it), or 0. */
int own_listener_port(int port);

#pragma GCC visibility pop

#endif
