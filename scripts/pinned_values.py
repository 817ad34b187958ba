#!/usr/bin/env python3
# Independent reference for the pinned constants of ps-server/src/init.rs
# (pinned_first_value) and proto/src/route.rs (pinned_values): splitmix64,
# FNV-1a, the router formula and the uniform/normal initialisers written from
# their documented definitions, f32 rounding emulated with struct. Run:
# python3 scripts/pinned_values.py
import struct, math
M=(1<<64)-1
def sm(x):
    x=(x+0x9E3779B97F4A7C15)&M
    x=((x^(x>>30))*0xBF58476D1CE4E5B9)&M
    x=((x^(x>>27))*0x94D049BB133111EB)&M
    return x^(x>>31)
def fnv(b):
    h=0xcbf29ce484222325
    for c in b:
        h^=c; h=(h*0x100000001B3)&M
    return h
def f32(x): return struct.unpack('<f',struct.pack('<f',x))[0]
PHI=0x9E3779B97F4A7C15
def unit(x): return f32((x>>40)*(1.0/(1<<24)))
def uniform(seed,id,scale,n):
    base=sm(seed^sm(id)); out=[]
    for k in range(1,n+1):
        u=unit(sm((base+k*PHI)&M))
        out.append(f32(scale*f32(f32(2.0*u)-1.0)))
    return out
print("uniform seed1 id0 scale1:", [repr(v) for v in uniform(1,0,1.0,2)], [hex(struct.unpack('<I',struct.pack('<f',v))[0]) for v in uniform(1,0,1.0,2)])
print("uniform seed7 id42 scale0.1 x4:", [hex(struct.unpack('<I',struct.pack('<f',v))[0]) for v in uniform(7,42,f32(0.1),4)])
def shard(table,id,n): return ((sm(id^fnv(table))%4096)*n)//4096
print("item 0..8 on 4:", [shard(b"item",i,4) for i in range(8)])
print("user 1000..1008 on 3:", [shard(b"user",i,3) for i in range(1000,1008)])
print("buckets item 0..4:", [sm(i^fnv(b"item"))%4096 for i in range(4)])
print("dense names on 4:", [(n, shard(b"", fnv(n.encode()),4)) for n in ["mlp.0.weight","mlp.0.bias","att.w"]])
print(hex(sm(0)), hex(fnv(b"a")))
def normal(seed,id,n,trunc=False):
    base=sm(seed^sm(id)); ctr=0; out=[]
    def nxt():
        nonlocal ctr; ctr+=1; return sm((base+ctr*PHI)&M)
    for _ in range(n):
        for _ in range(64):
            u1=1.0-unit(nxt()); u2=unit(nxt())
            z=math.sqrt(-2*math.log(u1))*math.cos(2*math.pi*u2)
            if not trunc or abs(z)<=2: break
        out.append(z)
    return out
print("normal seed3 id5:", normal(3,5,3))
