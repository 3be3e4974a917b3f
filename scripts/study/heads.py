# Offline head study on embeddings written by
#   cargo run --release -p feature-server --example knn_loo -- --backbone mobilenet_v2 \
#     --weights weights/mobilenet_v2.safetensors --dataset ../shared/datasets/NAME --save-embeddings /tmp/emb/NAME
# Usage: python3 scripts/study/heads.py NAME ncm,pt_ncm,lin,pt_lin,ens,pt_ens   (needs numpy)
# Same k-shot protocol as client eval (its own random splits); seconds instead of minutes.
import numpy as np, sys, time
def load(name):
    lab=[l.rstrip('\n').split('\t') for l in open(f'/tmp/emb/{name}/labels.tsv')]
    X=np.fromfile(f'/tmp/emb/{name}/embeddings.f32',dtype='<f4').reshape(len(lab),-1).astype(np.float64)
    child=[c for _,_,c in lab]; parent=[p for _,p,_ in lab]
    cs=sorted(set(child)); ci={c:i for i,c in enumerate(cs)}
    y=np.array([ci[c] for c in child]); pmap={}
    for c,p in zip(child,parent): pmap[ci[c]]=p
    ps=sorted(set(parent)); pi={p:i for i,p in enumerate(ps)}
    cp=np.array([pi[pmap[i]] for i in range(len(cs))])
    return X,y,cp
def split(y,k,seed):
    rng=np.random.default_rng(seed); tr=[];te=[]
    for c in np.unique(y):
        idx=np.where(y==c)[0]; idx=idx[rng.permutation(len(idx))]
        tr+=list(idx[:k]); te+=list(idx[k:])
    return np.array(tr),np.array(te)
def softmax(z):
    z=z-z.max(1,keepdims=True); e=np.exp(z); return e/e.sum(1,keepdims=True)
def prep(Xtr,Xte,power):
    if power: Xtr=np.sqrt(np.maximum(Xtr,0)); Xte=np.sqrt(np.maximum(Xte,0))
    m=Xtr.mean(0); Xtr=Xtr-m; Xte=Xte-m
    Xtr/=np.linalg.norm(Xtr,axis=1,keepdims=True); Xte/=np.linalg.norm(Xte,axis=1,keepdims=True)
    return Xtr,Xte
def ncm_logits(Xtr,ytr,Xte,C):
    M=np.stack([Xtr[ytr==c].mean(0) for c in range(C)]); M/=np.linalg.norm(M,axis=1,keepdims=True)
    return Xte@M.T, M
def linear(Xtr,ytr,C,init=None,steps=300,lr=0.05,wd=1e-3,scale=10.0,bal=True, anchor=0.0):
    n,d=Xtr.shape; W=np.zeros((C,d)) if init is None else init.copy(); b=np.zeros(C)
    W0=W.copy()
    Y=np.eye(C)[ytr]; cnt=Y.sum(0); w=(1.0/cnt[ytr]) if bal else np.ones(n); w=w/w.sum()
    m=[np.zeros_like(W),np.zeros_like(b)]; v=[np.zeros_like(W),np.zeros_like(b)]
    for t in range(1,steps+1):
        P=softmax(scale*(Xtr@W.T)+b); G=(P-Y)*w[:,None]
        gW=scale*G.T@Xtr + wd*W + anchor*(W-W0); gb=G.sum(0)
        for i,(p,g) in enumerate(((W,gW),(b,gb))):
            m[i]=0.9*m[i]+0.1*g; v[i]=0.999*v[i]+0.001*g*g
            p-= lr*(m[i]/(1-0.9**t))/(np.sqrt(v[i]/(1-0.999**t))+1e-8)
    return W,b
def run(name,ks,seeds,heads):
    X,y,cp=load(name); C=y.max()+1
    res={h:{k:[] for k in ks} for h in heads}
    for k in ks:
        for s in seeds:
            tr,te=split(y,k,s)
            for power in (False,True):
                Xtr,Xte=prep(X[tr],X[te],power)
                L,M=ncm_logits(Xtr,y[tr],Xte,C)
                tag='pt_' if power else ''
                if tag+'ncm' in heads: res[tag+'ncm'][k].append((L.argmax(1)==y[te]).mean())
                if tag+'lin' in heads or tag+'ens' in heads or tag+'lin_p' in heads:
                    W,b=linear(Xtr,y[tr],C)
                    Ll=10*(Xte@W.T)+b
                    if tag+'lin' in heads: res[tag+'lin'][k].append((Ll.argmax(1)==y[te]).mean())
                    if tag+'ens' in heads:
                        P=0.5*softmax(Ll)+0.5*softmax(L*10)
                        res[tag+'ens'][k].append((P.argmax(1)==y[te]).mean())
                if tag+'lin_p' in heads:
                    W,b=linear(Xtr,y[tr],C,init=M,anchor=0.0,wd=1e-2)
                    Ll=10*(Xte@W.T)+b
                    res[tag+'lin_p'][k].append((Ll.argmax(1)==y[te]).mean())
    for h in heads:
        print(name, h.ljust(8), '  '.join(f'k{k}: {100*np.mean(res[h][k]):5.1f}±{100*np.std(res[h][k]):.1f}' for k in ks))
heads=sys.argv[2].split(',')
name=sys.argv[1]; seeds=range(10) if name=="pets" else range(3)
run(name,[1,3,5,8],seeds,heads)
