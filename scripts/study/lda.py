# Covariance-aware heads against nearest class mean: shrinkage LDA (pooled within-class
# covariance) and whitening by the enrolled photos' covariance, at several shrinkages.
# Usage: python3 scripts/study/lda.py pets 0.3,0.6,0.9   (needs numpy; slow: minutes)
import numpy as np, sys
exec(open(__file__.replace("lda.py", "heads.py")).read().split("heads=sys.argv")[0])
name=sys.argv[1]; X,y,cp=load(name); C=y.max()+1
seeds=range(10) if name=='pets' else range(3)
alphas=[float(a) for a in sys.argv[2].split(',')]
def lda(Xtr,ytr,Xte,alpha):
    M=np.stack([Xtr[ytr==c].mean(0) for c in range(C)])
    R=Xtr-M[ytr]; d=Xtr.shape[1]
    S=R.T@R/max(len(Xtr),1)
    tr=np.trace(S)/d if np.trace(S)>0 else 1.0/d
    Sig=(1-alpha)*S+alpha*tr*np.eye(d)
    A=np.linalg.solve(Sig,M.T)  # d x C
    return Xte@A-0.5*np.sum(M*A.T,1)
def totalw(Xtr,ytr,Xte,alpha):
    S=np.cov(Xtr.T,bias=True); d=S.shape[0]; tr=np.trace(S)/d
    Sig=(1-alpha)*S+alpha*tr*np.eye(d)
    w,V=np.linalg.eigh(Sig); W=V@np.diag(w**-0.5)@V.T
    A=Xtr@W; B=Xte@W
    A/=np.linalg.norm(A,axis=1,keepdims=True); B/=np.linalg.norm(B,axis=1,keepdims=True)
    return ncm_logits(A,ytr,B,C)[0]
for k in [1,3,5,8]:
  res={}
  for s in seeds:
    tr,te=split(y,k,s); Xtr,Xte=prep(X[tr],X[te],False)
    res.setdefault('ncm',[]).append((ncm_logits(Xtr,y[tr],Xte,C)[0].argmax(1)==y[te]).mean())
    for a in alphas:
      if k>1: res.setdefault(f'lda{a}',[]).append((lda(Xtr,y[tr],Xte,a).argmax(1)==y[te]).mean())
      res.setdefault(f'tw{a}',[]).append((totalw(Xtr,y[tr],Xte,a).argmax(1)==y[te]).mean())
  print(f'k{k}', '  '.join(f'{h}:{100*np.mean(v):5.1f}' for h,v in res.items()),flush=True)
