"""The shape of torchvision's references/classification/train.py (ImageFolder data, a DistributedSampler,
torchvision.models.get_model, SGD with a weight-decay split, StepLR, label smoothing, a MetricLogger-
style epoch loop, evaluation, checkpoint on rank 0), cut to what a CPU test runs; the one fa_hvd line
is marked. The last line prints this rank's parameter checksum for the test."""
import datetime
import os
import time
import zlib

import torch
import torch.utils.data
import torchvision
from torch import nn
from torchvision.transforms import v2 as T

import fa_hvd.ddp


def init_distributed_mode(args):
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ["LOCAL_RANK"])
    else:
        print("Not using distributed mode")
        args.distributed = False
        return
    args.distributed = True
    if torch.cuda.is_available():
        torch.cuda.set_device(args.gpu)
    args.dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
    print(f"| distributed init (rank {args.rank}): {args.dist_url}", flush=True)
    torch.distributed.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                         world_size=args.world_size, rank=args.rank)
    torch.distributed.barrier()


def set_weight_decay(model, weight_decay, norm_weight_decay):
    norm_classes = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    params = {"other": [], "norm": []}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                params["norm" if isinstance(module, norm_classes) else "other"].append(p)
    return [{"params": params["other"], "weight_decay": weight_decay},
            {"params": params["norm"], "weight_decay": norm_weight_decay}]


def train_one_epoch(model, criterion, optimizer, data_loader, device, epoch, args):
    model.train()
    for i, (image, target) in enumerate(data_loader):
        start_time = time.time()
        image, target = image.to(device), target.to(device)
        output = model(image)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        acc1 = (output.argmax(1) == target).float().mean().item() * 100
        if i % args.print_freq == 0:
            print(f"Epoch: [{epoch}] [{i}/{len(data_loader)}] loss: {loss.item():.4f} acc1: {acc1:.1f} "
                  f"img/s: {image.shape[0] / (time.time() - start_time):.1f}", flush=True)


def evaluate(model, criterion, data_loader, device):
    model.eval()
    correct = torch.zeros(2)  # [right, seen]
    with torch.inference_mode():
        for image, target in data_loader:
            output = model(image.to(device))
            correct += torch.tensor([float((output.argmax(1) == target.to(device)).sum()), float(len(target))])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
    print(f"Test:  Acc@1 {100 * correct[0] / correct[1]:.3f}", flush=True)


def main(args):
    init_distributed_mode(args)
    print(args)
    device = torch.device(args.device)
    transform = T.Compose([T.PILToTensor(), T.ToDtype(torch.float, scale=True),
                           T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), T.ToPureTensor()])
    dataset = torchvision.datasets.ImageFolder(os.path.join(args.data_path, "train"), transform)
    dataset_test = torchvision.datasets.ImageFolder(os.path.join(args.data_path, "val"), transform)
    if args.distributed:
        train_sampler = torch.utils.data.distributed.DistributedSampler(dataset)
        test_sampler = torch.utils.data.distributed.DistributedSampler(dataset_test, shuffle=False)
    else:
        train_sampler = torch.utils.data.RandomSampler(dataset)
        test_sampler = torch.utils.data.SequentialSampler(dataset_test)
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=train_sampler,
                                              num_workers=args.workers)
    data_loader_test = torch.utils.data.DataLoader(dataset_test, batch_size=args.batch_size, sampler=test_sampler,
                                                   num_workers=args.workers)

    print("Creating model")
    model = torchvision.models.get_model(args.model, weights=None, num_classes=len(dataset.classes))
    model.to(device)
    if args.distributed and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    parameters = (set_weight_decay(model, args.weight_decay, args.norm_weight_decay)
                  if args.norm_weight_decay is not None else model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.device == "cuda"
                                                          else None)
        fa_hvd.ddp.wrap(model, aggregator="flag", f=1)  # fa_hvd: the robust aggregate instead of the average
        model_without_ddp = model.module

    print("Start training")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            train_sampler.set_epoch(epoch)
        train_one_epoch(model, criterion, optimizer, data_loader, device, epoch, args)
        lr_scheduler.step()
        evaluate(model, criterion, data_loader_test, device=device)
        if args.output_dir and (not args.distributed or args.rank == 0):
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args}
            torch.save(checkpoint, os.path.join(args.output_dir, "checkpoint.pth"))
    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    crc = 0
    for p in model_without_ddp.parameters():
        crc = zlib.crc32(p.detach().cpu().numpy().tobytes(), crc)
    print(f"PARAMS rank {getattr(args, 'rank', 0)} crc {crc:08x}", flush=True)


def get_args_parser(add_help=True):
    import argparse

    parser = argparse.ArgumentParser(description="PyTorch Classification Training", add_help=add_help)
    parser.add_argument("--data-path", default="/datasets01/imagenet_full_size/061417/", type=str)
    parser.add_argument("--model", default="resnet18", type=str)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str)
    parser.add_argument("-b", "--batch-size", default=32, type=int)
    parser.add_argument("--epochs", default=90, type=int)
    parser.add_argument("-j", "--workers", default=0, type=int)
    parser.add_argument("--lr", default=0.1, type=float)
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    parser.add_argument("--norm-weight-decay", default=None, type=float)
    parser.add_argument("--label-smoothing", default=0.0, type=float)
    parser.add_argument("--lr-step-size", default=30, type=int)
    parser.add_argument("--lr-gamma", default=0.1, type=float)
    parser.add_argument("--print-freq", default=10, type=int)
    parser.add_argument("--output-dir", default=".", type=str)
    parser.add_argument("--start-epoch", default=0, type=int)
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--dist-url", default="env://", type=str)
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    main(args)
